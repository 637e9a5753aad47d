import os

import torch

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from glm45v_npu.model.glm4v_moe import load_model  # noqa: E402
from glm45v_npu.model.hf_config import load_config  # noqa: E402
from tests.tiny import VL_VARIANTS, make_text_checkpoint, make_vl_checkpoint  # noqa: E402

torch.set_num_threads(2)


class Checkpoint:
    """A tiny checkpoint on disk, the transformers model that wrote it, and ours loaded from it."""

    def __init__(self, path, ref):
        self.path, self.ref = path, ref
        self.cfg = load_config(path)
        self._ours = {}

    def ours(self, dtype=torch.float32):
        if dtype not in self._ours:
            self._ours[dtype] = load_model(self.path, self.cfg, dtype, "cpu")
        return self._ours[dtype]


@pytest.fixture(scope="session", params=list(VL_VARIANTS))
def vl_ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return Checkpoint(path, make_vl_checkpoint(path, request.param))


@pytest.fixture(scope="session", params=["qk-norm", "no-qk-norm"])
def text_ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return Checkpoint(path, make_text_checkpoint(path, request.param))


@pytest.fixture()
def triton_kernels(monkeypatch):
    """Force every op onto the Triton kernels (the interpreter on a CPU), the fused decode path included."""
    from glm45v_npu.kernels import ops

    monkeypatch.setenv("GLM45V_KERNELS", "triton")
    monkeypatch.setattr(ops, "_cache", {})
    calls = []
    real = ops._triton_impls

    def counting():
        impls = real()
        return {name: (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k))[1])(fn, name)
                for name, fn in impls.items()}

    monkeypatch.setattr(ops, "_triton_impls", counting)
    return calls


@pytest.fixture()
def fake(monkeypatch):
    """A stand-in torch_npu (tests/fake_torch_npu.py) behind platform.torch_npu_module."""
    from glm45v_npu import platform
    from tests.fake_torch_npu import FakeTorchNpu

    npu = FakeTorchNpu()
    monkeypatch.setattr(platform, "torch_npu_module", lambda: npu)
    return npu


@pytest.fixture()
def npu_everywhere(monkeypatch, fake):
    """ops.impl as on an NPU: every op with a torch_npu path runs it (via the stand-in) behind its self-check."""
    from glm45v_npu.kernels import ops

    monkeypatch.setattr(ops, "_cache", {})
    checked = {}

    def impl(op, device):
        if op not in checked:
            portable = ops.portable(op, device)
            checked[op] = (ops.SelfChecked(op, ops.NPU_OPS[op], portable, ops.TWINS[op], ops.CHECK_KIND[op],
                                           ops.IN_PLACE_CHECK.get(op)) if op in ops.NPU_OPS else portable)
        return checked[op]

    monkeypatch.setattr(ops, "impl", impl)
    return checked

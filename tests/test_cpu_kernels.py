"""The CPU's native kernels (kernels/cpu_kernels.cpp) against float64 twins, on every path this machine has (AMX
tiles, AVX-512 bf16 dot products, the generic fp32 path), every weight type and scale layout, odd sizes and
tails; and the engine's CPU decode running them (each proven at its first call, none falling back)."""

from __future__ import annotations

import pytest
import torch

from glm45v_npu.kernels import cpu, ops
from glm45v_npu.kernels.fused_moe import fused_moe_torch
from glm45v_npu.kernels.metadata import AttentionMetadata
from glm45v_npu.kernels.paged_attention import paged_attention_torch
from glm45v_npu.kernels.quant import FP8, QuantSpec, expand, quant_linear_torch, quantize_weight

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler here: the CPU kernels were not built")

PATHS = {"generic": 0, "dot": 1, "amx": 3}


def _narrow(name):
    full = int(torch.ops.glm45v_cpu.caps())
    want = PATHS[name]
    if full & want != want:
        pytest.skip(f"this CPU has no {name} path (caps {full})")
    torch.ops.glm45v_cpu.limit_caps(want)
    cpu.caps.cache_clear()
    yield name
    torch.ops.glm45v_cpu.limit_caps(3)
    cpu.caps.cache_clear()


@pytest.fixture(params=list(PATHS))
def path(request):
    """Narrow the kernels to one path (the bf16 paths only where the CPU has them)."""
    yield from _narrow(request.param)


@pytest.fixture(params=["dot", "amx"])
def bf16_path(request):
    yield from _narrow(request.param)


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _weight(N, K, dtype, seed=1):
    if dtype == torch.int8:
        return torch.randint(-127, 128, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    return (_rand(N, K, seed=seed) * (8 if dtype == FP8 else 0.5)).to(dtype)


def _close(got, want, bound):
    """|got - want| within 1e-4 of the sum of |products| (the rounding a fp32 sum of bf16-exact terms allows),
    plus the rounding of the output to its own dtype."""
    err = (got.double() - want.double()).abs().max().item()
    rounding = torch.finfo(got.dtype).eps * float(want.abs().max()) if got.dtype != torch.float32 else 0.0
    assert err <= 1e-4 * max(1.0, bound) + rounding, (err, bound)


SHAPES = [(1, 37, 24), (3, 64, 200), (5, 130, 256), (17, 70, 96), (33, 64, 160)]
# float weights carry no scales; 128-column groups come with K a multiple of 32 in every scheme
LINEAR_CASES = [(wdtype, shape, scales) for wdtype in (torch.bfloat16, torch.float16, torch.float32, FP8, torch.int8)
                for shape in SHAPES for scales in (("none", "row", "group") if wdtype in (FP8, torch.int8) else ("none",))
                if not (scales == "group" and shape[2] % 32)]


@pytest.mark.parametrize("wdtype, shape, scales", LINEAR_CASES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_against_float64(path, wdtype, shape, scales, bias):
    """out = x W^T with per-row or per-128-column scales and bias; bf16 activations where the path takes them."""
    M, N, K = shape
    w = _weight(N, K, wdtype)
    G = -(-K // 128) if scales == "group" else 1
    ws = (torch.rand(N, G, generator=torch.Generator().manual_seed(3)) + 0.5) if scales != "none" else None
    b = _rand(N, seed=4) if bias else None
    bf16 = path != "generic" and wdtype in (torch.bfloat16, FP8)
    x = _rand(M, K, seed=2).to(torch.bfloat16 if bf16 else torch.float32)
    got = torch.ops.glm45v_cpu.linear(x, w, None, ws, 128 if scales == "group" else 0, b)
    wd = w.double() * (expand(ws.double(), K, 128) if ws is not None else 1)
    want = x.double() @ wd.T + (b.double() if bias else 0)
    _close(got, want, float((x.double().abs() @ wd.abs().T).max()))


@pytest.mark.parametrize("act", ["token", "group"])
@pytest.mark.parametrize("M", [1, 4, 20])
def test_linear_with_quantized_activations(bf16_path, act, M):
    """fp8 activations with per-token or per-group scales, applied after the sums (the bf16 paths; the generic
    path takes dequantized fp32 activations)."""
    K, N = 384, 96
    w = _weight(N, K, FP8)
    ws = torch.rand(N, 3) + 0.5
    xq = (_rand(M, K, seed=5) * 30).to(FP8)
    xs = torch.rand(M, 3 if act == "group" else 1, generator=torch.Generator().manual_seed(6)) + 0.1
    got = torch.ops.glm45v_cpu.linear(xq.to(torch.bfloat16), w, xs, ws, 128, None)
    xd = xq.double() * expand(xs.double(), K, 128)
    wd = w.double() * expand(ws.double(), K, 128)
    _close(got, xd @ wd.T, float((xd.abs() @ wd.abs().T).max()))


SPECS = [None, QuantSpec("fp8", "none"), QuantSpec("fp8", "token"), QuantSpec("fp8", "group", 128),
         QuantSpec("fp8", "token", 128), QuantSpec("int8", "token"), QuantSpec("int8", "none")]


@pytest.mark.parametrize("spec", SPECS[1:], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 9])
def test_quant_linear_equals_the_twin(path, spec, dtype, T):
    """The engine's quant_linear on the CPU against the float twin of the same scheme (same activation
    quantization: both quantize in float32)."""
    K, N = 256, 80
    wq, ws = quantize_weight(_rand(N, K, seed=7, scale=0.1), spec)
    x = _rand(T, K, seed=8).to(dtype)
    bias = _rand(N, seed=9)
    got = cpu.quant_linear(x, wq, ws, bias, spec)
    want = quant_linear_torch(x.float() if spec.act != "none" else x.double(), wq, ws, bias, spec)
    wd = wq.double() * expand(ws.double(), K, spec.group or K)
    _close(got, want, float((x.double().abs() @ wd.abs().T).max()))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, E, topk, other_rank", [(1, 8, 2, False), (4, 6, 3, True), (16, 16, 4, False),
                                                  (24, 4, 2, True), (80, 4, 2, False)])
def test_fused_moe_equals_the_twin(path, spec, dtype, T, E, topk, other_rank):
    """Routed experts, two native calls, against fused_moe_torch: float weights against the float64 twin,
    8-bit ones against the twin of the same scheme at the same input dtype; pairs for another rank's experts (id E) are
    skipped by both."""
    H, inter = 128, 96
    g = torch.Generator().manual_seed(10)
    w13f, w2f = _rand(E, 2 * inter, H, seed=11, scale=0.1), _rand(E, H, inter, seed=12, scale=0.1)
    x = _rand(T, H, seed=13).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)])
    if other_rank:
        ids[0, 0] = E
    weights = torch.rand(T, topk, generator=g)
    if spec is None:
        w13, w2, s13, s2 = w13f.to(dtype), w2f.to(dtype), None, None
        want = fused_moe_torch(x.double(), w13.double(), w2.double(), weights, ids)
    else:
        q13 = [quantize_weight(w, spec) for w in w13f]
        q2 = [quantize_weight(w, spec) for w in w2f]
        w13, s13 = torch.stack([q for q, _ in q13]), torch.stack([s for _, s in q13])
        w2, s2 = torch.stack([q for q, _ in q2]), torch.stack([s for _, s in q2])
        want = fused_moe_torch(x if spec.act != "none" else x.double(), w13, w2, weights, ids, s13, s2, spec)
    got = cpu.fused_moe(x, w13, w2, weights, ids, s13, s2, spec)
    assert got.dtype == x.dtype
    if spec is not None and spec.act != "none":
        # the SwiGLU output is quantized again from sums taken in another order: now and then one element lands
        # one 8-bit step away; the rest agree to the output's rounding
        assert ops.agree_rows(got, want)
        assert (got.double() - want.double()).norm() <= 5e-3 * want.double().norm()
        return
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # the output is rounded to x's dtype
    assert (got.double() - want.double()).abs().max() <= tol * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, Hq, Hkv, D, bs", [(1, 12, 1, 16, 16), (3, 6, 2, 32, 4), (2, 4, 4, 24, 8)])
def test_decode_attention_against_float64(cache_dtype, B, Hq, Hkv, D, bs):
    """One query per sequence over its paged cache (blocks out of order, a sequence with one key, a context
    that ends mid-block) against the twin's gather + SDPA in float64."""
    lens = torch.tensor([1, 2 * bs + 3, 5 * bs][:B], dtype=torch.int32)
    blocks = -(-int(lens.max()) // bs)
    perm = torch.randperm(B * blocks, generator=torch.Generator().manual_seed(14))
    tables = perm.view(B, blocks).int()
    kc = _rand(B * blocks, bs, Hkv, D, seed=15).to(cache_dtype)
    vc = _rand(B * blocks, bs, Hkv, D, seed=16).to(cache_dtype)
    q = _rand(B, Hq, D, seed=17)
    meta = AttentionMetadata(torch.arange(B + 1, dtype=torch.int32), lens, tables, B, 1, int(lens.max()), True)
    got = cpu.paged_attention(q, kc, vc, meta, D**-0.5)
    want = paged_attention_torch(q.double(), kc.double(), vc.double(), meta, D**-0.5)
    assert (got.double() - want).abs().max() <= 1e-5


def test_engine_decode_runs_the_native_kernels(tmp_path):
    """A bf16 generate on the tiny checkpoint: every native op serves and passes its first-call check."""
    from glm45v_npu import LLM, SamplingParams
    from glm45v_npu.kernels import ops
    from tests.tiny import make_vl_checkpoint

    make_vl_checkpoint(tmp_path)
    ops._cache.clear()
    llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=256)
    out = llm.generate(["hello there"] * 3, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)
    served = {op: ops._cache[(op, "cpu")] for op in cpu.OPS if (op, "cpu") in ops._cache}
    assert set(served) == {"linear", "fused_moe", "paged_attention"}, served
    for op, impl in served.items():
        assert isinstance(impl, ops.SelfChecked) and impl.source == "native CPU kernel", op
        assert impl.verified is True, f"{op} failed or never ran its first-call check"

"""Quantized checkpoints (issue 20): FP8 folders made by llm-compressor against transformers + compressed-tensors;
FP8_BLOCK, weight-only FP8, online fp8 and msmodelslim W8A8 / W8A8_DYNAMIC against the float64 twin engine run;
the 8-bit kernels against their twins; torch_npu's int8 ops through the stand-in; memory; bad checkpoints."""

import json
import shutil

import pytest
import torch

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.errors import Glm45vError
from glm45v_npu.kernels.fused_moe import fused_moe_torch, fused_moe_triton
from glm45v_npu.kernels.quant import (
    QuantSpec,
    quant_linear_torch,
    quant_linear_triton,
    quantize_weight,
    weight_values,
)
from tests.harness import PagedRunner, build_prompt
from tests.quantized import faithful_reference, fp8_folder, msmodelslim_folder, weight_only_fp8
from tests.tiny import image_processor, make_text_checkpoint, make_vl_checkpoint, random_image

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=5)
SCORE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5)
# 8-bit activations are a step function: a float32 run's last-bit differences (batch shape, summation order)
# round an element one 8-bit step away from the float64 run's now and then, and one such step moves a logprob of
# these tiny models by up to 0.07 (FP8_BLOCK, seeds 19-26, measured). Weight-only runs have no such step.
ACT_TOL, WEIGHT_TOL = 0.1, 2e-3
REQUESTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11]}, {"prompt_token_ids": [40, 41, 42]}]
# dims that are multiples of 128 where llm-compressor's block quantizer needs them (k/v rows stay 64)
BLOCKS = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_attention_heads=8, head_dim=32)


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    src = tmp_path_factory.mktemp("vl-float")
    make_vl_checkpoint(src, "gqa2-hd32-half-rope", seed=13)
    return src


@pytest.fixture(scope="module")
def vl_fp8(vl, tmp_path_factory):
    return fp8_folder(vl, tmp_path_factory.mktemp("vl-fp8") / "m")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    src = tmp_path_factory.mktemp("text-float")
    return src, make_text_checkpoint(src, "qk-norm", seed=17)


def _lp(out):
    c = out.outputs[0]
    return [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]


def _same_run(a, b, tol):
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert max(abs(p - q) for p, q in zip(_lp(x), _lp(y))) <= tol


def _twin_agrees(outputs, twin, tol):
    """The float64 twin scores the engine's own greedy tokens, one prefix at a time (teacher forcing: a near tie
    decided the other way does not send the two runs down different texts). Each token is the twin's greedy
    token, or one whose twin logprob is within tol of it, and its logprob is the twin's within tol."""
    for out in outputs:
        c, prefix = out.outputs[0], list(out.prompt_token_ids)
        for token, mine in zip(c.token_ids, c.logprobs):
            t = twin.generate([{"prompt_token_ids": prefix}], SCORE)[0].outputs[0]
            theirs = t.logprobs[0]
            assert token in theirs, f"after {prefix}: {token} is not among the twin's top {SCORE.logprobs}"
            assert t.token_ids[0] in mine, f"after {prefix}: the twin's {t.token_ids[0]} is not in our top logprobs"
            assert theirs[t.token_ids[0]].logprob - theirs[token].logprob <= tol
            assert abs(mine[token].logprob - theirs[token].logprob) <= tol
            prefix.append(token)


# --- FP8_DYNAMIC (GLM-4.5V-FP8's scheme) against transformers + compressed-tensors ---------------------------------


def _against_reference(path, images, prompt, steps=8):
    """Our model (prefill, then decode through the paged cache) and the reference on the same tokens: the
    chosen-token logprobs of each greedy step. Both take transformers' vision output for the image (the vision
    tower is float and equals transformers' to ~1e-6 in the float parity tests; an FP8 activation rounding
    decision turns such a difference into a visible one, which is not what this compares)."""
    from glm45v_npu.model.glm4v_moe import load_model
    from glm45v_npu.model.hf_config import load_config
    from glm45v_npu.model.quantization import read_plan

    ref = faithful_reference(path)
    cfg = load_config(path)
    ours = load_model(path, cfg, torch.float32, "cpu", plan=read_plan(path))
    kw = {}
    if images:
        px = image_processor()(images=images, return_tensors="pt")
        kw = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        with torch.inference_mode():
            feats = ref.model.get_image_features(**kw)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        ours.encode_images = lambda pixels, grids: list(torch.cat(list(feats)).split(
            [t * h * w // 4 for t, h, w in grids]))
    runner = PagedRunner(ours)
    logits, state = runner.prefill(prompt, images)
    seq, mine = list(prompt), [logits[-1]]
    for _ in range(steps):
        seq.append(int(mine[-1].argmax()))
        mine.append(runner.decode([state], [seq[-1]])[0])
    full = torch.tensor([seq])
    mm = (full == cfg.image_token_id).int() if images else None
    with torch.inference_mode():
        extra = dict(kw, mm_token_type_ids=mm) if images else {}
        theirs = ref(input_ids=full, **extra).logits[0, len(prompt) - 1 :]
    ours_lp = torch.log_softmax(torch.stack(mine).float(), -1)
    theirs_lp = torch.log_softmax(theirs.float(), -1)
    return ours_lp, theirs_lp


def test_fp8_dynamic_vl_with_an_image_equals_transformers(vl_fp8):
    images = [random_image(90, 60, 3)]
    grids = [tuple(g) for g in image_processor()(images=images, return_tensors="pt")["image_grid_thw"].tolist()]
    ours, theirs = _against_reference(vl_fp8, images, build_prompt([6, 5], grids, seed=2))
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))  # the same greedy tokens
    chosen = ours.argmax(-1, keepdim=True)
    assert (ours.gather(1, chosen) - theirs.gather(1, chosen)).abs().max() <= 2e-2


def test_fp8_dynamic_text_qk_norm_equals_transformers(text, tmp_path):
    src, _ = text
    folder = fp8_folder(src, tmp_path / "fp8")
    ours, theirs = _against_reference(folder, [], build_prompt([14], [], seed=5))
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    chosen = ours.argmax(-1, keepdim=True)
    assert (ours.gather(1, chosen) - theirs.gather(1, chosen)).abs().max() <= 2e-2


def test_fp8_engine_run_equals_the_model_run_and_holds_8_bit_weights(vl_fp8, vl):
    llm = LLM(vl_fp8, block_size=4, kv_cache_gib=0.002)
    assert "FP8_DYNAMIC" in llm.engine.quant_plan.describe()
    model = llm.engine.runner.model
    layer = model.language_model.layers[1]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.mlp.experts.w13.dtype == torch.float8_e4m3fn
    assert model.lm_head.weight.dtype == torch.float32 and layer.mlp.gate.weight.dtype == torch.float32
    assert model.visual.blocks[0].attn.qkv.weight.dtype == torch.float32  # ignored: float
    _twin_agrees(llm.generate(REQUESTS, GREEDY), LLM(vl_fp8, block_size=4, kv_cache_gib=0.002, dtype="float64"),
                 ACT_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [True, False], ids=["ep", "tp-experts"])
def test_fp8_at_tp2_equals_tp1(vl_fp8, expert_parallel):
    """Row-parallel layers hold part of each token's row: its per-token scale is agreed over the ranks (max), so
    the split changes nothing but summation order (unsynced, tp-experts flips a token here)."""
    one = LLM(vl_fp8, block_size=4, kv_cache_gib=0.002).generate(REQUESTS, GREEDY)
    two = LLM(vl_fp8, block_size=4, kv_cache_gib=0.002, tensor_parallel_size=2,
              enable_expert_parallel=expert_parallel)
    try:
        _same_run(two.generate(REQUESTS, GREEDY), one, 1e-4)
    finally:
        two.close()


# --- FP8_BLOCK, weight-only FP8, online fp8: against the float64 twin ------------------------------------------


def _weights_within_fp8_rounding(quantized, floats) -> None:
    """Each 8-bit weight times its scales is the float checkpoint's weight to within e4m3's rounding (half a step:
    1/16 of the value, or 2^-10 of the scale below e4m3's normal range; a little more for the quantizer's own
    bf16 division). This checks where every scale lands (128-blocks, fused q/k/v and gate/up rows, experts),
    which the twin run cannot: it loads the same way."""
    from glm45v_npu.kernels.quant import expand
    from glm45v_npu.model.layers import QuantLinear
    from glm45v_npu.model.moe import Experts

    want = dict(floats.named_parameters())
    checked = 0
    for name, m in quantized.named_modules():
        pairs = [("weight", "weight_scale")] if isinstance(m, QuantLinear) else \
            [("w13", "w13_scale"), ("w2", "w2_scale")] if isinstance(m, Experts) and m.quant is not None else []
        for w, s in pairs:
            q = getattr(m, w)
            scale = expand(getattr(m, s).double(), q.shape[-1], m.quant.spec.group)
            ref = want[f"{name}.{w}"].double()
            err = (q.double() * scale - ref).abs()
            assert (err <= ref.abs() * (1 / 16 + 2**-8) + scale * 2**-9).all(), f"{name}.{w}"
            checked += 1
    assert checked >= 4 * len(quantized.language_model.layers)


def _quantized_bytes_ratio(plan) -> float:
    """At GLM-4.5V's shapes (2 layers, meta device): the bytes of the layers the plan quantizes, over the same
    layers in bf16."""
    from glm45v_npu.model.glm4v_moe import build_model
    from glm45v_npu.model.hf_config import builtin_config, load_config, with_num_layers
    from glm45v_npu.model.layers import QuantLinear
    from glm45v_npu.model.moe import Experts

    cfg = with_num_layers(load_config(builtin_config("glm-4.5v")), 2)
    quantized, floats = build_model(cfg, torch.bfloat16, "meta", plan=plan), build_model(cfg, torch.bfloat16, "meta")
    names = {n for n, m in quantized.named_modules() if isinstance(m, QuantLinear) or isinstance(m, Experts)
             and m.quant is not None}
    size = lambda model: sum(p.numel() * p.element_size() for n, m in model.named_modules() if n in names  # noqa: E731
                             for p in m.parameters(recurse=False))
    return size(quantized) / size(floats)


@pytest.mark.parametrize("kind", ["FP8_BLOCK", "weight-only", "online"])
def test_block_weight_only_and_online_fp8_equal_the_float64_twin(tmp_path, kind):
    src = tmp_path / "src"
    make_vl_checkpoint(src, "gqa2-hd32-half-rope", seed=19, **(BLOCKS if kind == "FP8_BLOCK" else {}))
    if kind == "online":
        folder, extra = src, dict(quantization="fp8")
    else:
        folder, extra = fp8_folder(src, tmp_path / "q", "FP8_BLOCK" if kind == "FP8_BLOCK" else weight_only_fp8()), {}
    llm = LLM(folder, block_size=4, kv_cache_gib=0.002, **extra)
    scheme = {"FP8_BLOCK": "FP8_BLOCK", "weight-only": "W8A16", "online": "online"}[kind]
    assert scheme in llm.engine.quant_plan.describe()
    twin = LLM(folder, block_size=4, kv_cache_gib=0.002, dtype="float64", **extra)
    _twin_agrees(llm.generate(REQUESTS, GREEDY), twin, WEIGHT_TOL if kind == "weight-only" else ACT_TOL)
    _weights_within_fp8_rounding(llm.engine.runner.model, LLM(src, kv_cache_gib=0.002).engine.runner.model)
    assert _quantized_bytes_ratio(llm.engine.quant_plan) <= 0.52


# --- msmodelslim W8A8 / W8A8_DYNAMIC ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True], ids=["W8A8", "W8A8_DYNAMIC"])
def test_msmodelslim_folders_equal_the_float64_twin(text, tmp_path, dynamic):
    """Made by msmodelslim's own Calibrator on the CPU (experts written per expert in its W8A8_DYNAMIC layout,
    tests/quantized.py says why)."""
    src, model = text
    folder = msmodelslim_folder(model, src, tmp_path / "ms", dynamic)
    llm = LLM(folder, block_size=4, kv_cache_gib=0.002)
    assert ("W8A8_DYNAMIC" if dynamic else "W8A8") in llm.engine.quant_plan.describe()
    layer = llm.engine.runner.model.language_model.layers[1]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.int8 and layer.mlp.experts.w13.dtype == torch.int8
    twin = LLM(folder, block_size=4, kv_cache_gib=0.002, dtype="float64")
    _twin_agrees(llm.generate(REQUESTS, GREEDY), twin, ACT_TOL)
    floats = LLM(src, block_size=4, kv_cache_gib=0.002).generate(REQUESTS, GREEDY)
    agree = sum(a == b for x, y in zip(llm.generate(REQUESTS, GREEDY), floats)
                for a, b in zip(x.outputs[0].token_ids, y.outputs[0].token_ids))
    assert agree >= len(REQUESTS) * GREEDY.max_tokens // 2  # the int8 model still follows the float one


# --- kernels under Triton's interpreter against their twins ---------------------------------------------------------

SPECS = [QuantSpec("fp8", "token"), QuantSpec("fp8", "group", 128), QuantSpec("fp8", "none"),
         QuantSpec("fp8", "none", 128), QuantSpec("fp8", "static"), QuantSpec("int8", "token"),
         QuantSpec("int8", "static")]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow, id="bfloat16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.weight}-{s.act}-{s.group}")
@pytest.mark.parametrize("M", [1, 3, 17, 64])
def test_quant_linear_kernel_equals_its_float64_twin(spec, M, dtype):
    K, N = (200, 72) if not spec.group else (256, 136)  # channel scales: K and N not multiples of 128
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g) / K**0.5
    wq, ws = quantize_weight(w, QuantSpec(spec.weight, spec.act, spec.group))
    bias = torch.randn(N, generator=g).to(dtype)
    static = {}
    if spec.act == "static":
        static = dict(input_scale=torch.tensor([0.02]), input_offset=torch.tensor([3.0]) if spec.weight == "int8" else None,
                      quant_bias=torch.randint(-500, 500, (N,), generator=g, dtype=torch.int32)
                      if spec.weight == "int8" else None)
    want = quant_linear_torch(x.double(), wq, ws, bias.double(), spec, **static)
    got = quant_linear_triton(x, wq, ws, bias, spec, **static)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and (got.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS[:4] + [SPECS[5]], ids=lambda s: f"{s.weight}-{s.act}-{s.group}")
def test_quantized_moe_kernel_equals_its_float64_twin(spec, dtype):
    T, E, K, H, inter = 9, 4, 3, 256 if spec.group else 200, 128 if spec.group else 72
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13, w2 = torch.randn(E, 2 * inter, H, generator=g) * H**-0.5, torch.randn(E, H, inter, generator=g) * inter**-0.5
    q13 = [quantize_weight(w, spec) for w in w13]
    q2 = [quantize_weight(w, spec) for w in w2]
    w13q, w13s = torch.stack([q for q, _ in q13]), torch.stack([s for _, s in q13])
    w2q, w2s = torch.stack([q for q, _ in q2]), torch.stack([s for _, s in q2])
    ids = torch.randint(0, E + 1, (T, K), generator=g)  # E: another rank's expert, skipped
    weights = torch.rand(T, K, generator=g)
    want = fused_moe_torch(x.double(), w13q, w2q, weights.double(), ids, w13s, w2s, spec)
    got = fused_moe_triton(x, w13q, w2q, weights, ids, w13s, w2s, spec)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


def test_fp8_bytes_decode_to_every_e4m3_value():
    """sm_80's Triton has no e4m3 type: FP8 weights reach its kernels as bytes, decoded in the kernel. All 256
    bytes (but the two NaNs) must give torch's own e4m3 values."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode(src, dst):
        i = tl.arange(0, 256)
        tl.store(dst + i, weight_values(tl.load(src + i), True))

    raw = torch.arange(256, dtype=torch.uint8)
    got = torch.empty(256)
    decode[(1,)](raw, got)
    want = raw.view(torch.float8_e4m3fn).float()
    finite = want.isfinite()
    assert finite.sum() == 254 and torch.equal(got[finite], want[finite])


@pytest.mark.parametrize("spec", [QuantSpec("fp8", "none"), QuantSpec("fp8", "none", 128), QuantSpec("fp8", "token")],
                         ids=lambda s: f"{s.act}-{s.group}")
def test_fp8_weights_as_bytes_equal_the_twin(spec, monkeypatch):
    """The kernels on sm_80's path (FP8 run weight-only, the weights passed as bytes), forced on the CPU."""
    from glm45v_npu.kernels import fused_moe, quant

    monkeypatch.setattr(quant, "fp8_dot", lambda device: False)
    monkeypatch.setattr(quant, "fp8_as_bytes", lambda spec, device: spec.weight == "fp8" and spec.act == "none")
    monkeypatch.setattr(fused_moe, "fp8_as_bytes", quant.fp8_as_bytes)
    g = torch.Generator().manual_seed(7)
    M, K, N = 5, 256, 136
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5
    wq, ws = quantize_weight(w, spec)
    only = QuantSpec("fp8", "none", spec.group)  # what sm_80 runs: activations unquantized
    want = quant_linear_torch(x.double(), wq, ws, None, only)
    assert (quant_linear_triton(x, wq, ws, None, spec).double() - want).abs().max() <= 2e-5 * want.abs().max()
    T, E, top, inter = 7, 4, 2, 128
    w13, w2 = torch.randn(E, 2 * inter, K, generator=g) * K**-0.5, torch.randn(E, K, inter, generator=g) * inter**-0.5
    q13, q2 = [quantize_weight(m, spec) for m in w13], [quantize_weight(m, spec) for m in w2]
    args = (torch.stack([q for q, _ in q13]), torch.stack([q for q, _ in q2]))
    scales = (torch.stack([s for _, s in q13]), torch.stack([s for _, s in q2]))
    ids, weights = torch.randint(0, E, (T, top), generator=g), torch.rand(T, top, generator=g)
    xe = torch.randn(T, K, generator=g)
    want = fused_moe_torch(xe.double(), *args, weights.double(), ids, *scales, only)
    got = fused_moe_triton(xe, *args, weights, ids, *scales, spec)
    assert (got.double() - want).abs().max() <= 2e-5 * want.abs().max()


@pytest.mark.parametrize("moe", [fused_moe_torch, fused_moe_triton], ids=["twin", "triton"])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[5]], ids=["fp8-token", "int8-token"])
def test_split_experts_agree_on_row_scales(spec, moe):
    """Tensor-parallel experts: two ranks' halves of the intermediate (sliced from the quantized weights, as the
    loader slices them), each scaling its rows by the max over both halves (row_max), sum to the whole; scaled by
    their own half alone they do not."""
    T, E, K, H, inter = 9, 4, 2, 96, 64
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * inter, H, generator=g) * H**-0.5
    w13[:, : inter // 2] *= 30  # one half's SwiGLU rows run much larger than the other's
    q13 = [quantize_weight(w, spec) for w in w13]
    q2 = [quantize_weight(w, spec) for w in torch.randn(E, H, inter, generator=g) * inter**-0.5]
    w13q, w13s = torch.stack([q for q, _ in q13]), torch.stack([s for _, s in q13])
    w2q, w2s = torch.stack([q for q, _ in q2]), torch.stack([s for _, s in q2])
    ids, weights = torch.randint(0, E, (T, K), generator=g), torch.rand(T, K, generator=g)

    def run(a, b, row_max):
        rows = torch.cat([torch.arange(a, b), torch.arange(inter + a, inter + b)])
        return moe(x, w13q[:, rows], w2q[:, :, a:b].contiguous(), weights, ids, w13s[:, rows], w2s, spec, row_max)

    halves = ((0, inter // 2), (inter // 2, inter))
    seen = []
    alone = [run(a, b, lambda s: seen.append(s.clone()) or s) for a, b in halves]
    both = torch.maximum(*seen)
    agreed = [run(a, b, lambda s: torch.maximum(s, both)) for a, b in halves]
    whole = moe(x, w13q, w2q, weights, ids, w13s, w2s, spec)
    scale = whole.abs().max()
    assert (agreed[0] + agreed[1] - whole).abs().max() <= 1e-5 * scale
    assert (alone[0] + alone[1] - whole).abs().max() > 1e-3 * scale


# --- Ascend: torch_npu's int8 ops (W8A8_DYNAMIC) through the stand-in --------------------------------------------


def test_w8a8_dynamic_through_torch_npu_equals_the_twin(monkeypatch):
    from glm45v_npu import platform
    from glm45v_npu.kernels import npu_ops
    from tests.fake_torch_npu import FakeTorchNpu

    fake = FakeTorchNpu()
    monkeypatch.setattr(platform, "torch_npu_module", lambda: fake)
    spec = QuantSpec("int8", "token")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=g)
    wq, ws = quantize_weight(torch.randn(40, 96, generator=g) / 10, spec)
    b = torch.randn(40, generator=g)
    assert torch.allclose(npu_ops.quant_linear(x, wq, ws, b, spec), quant_linear_torch(x, wq, ws, b, spec),
                          atol=1e-5)
    E, H, inter = 4, 96, 48
    q13 = [quantize_weight(torch.randn(2 * inter, H, generator=g) / 10, spec) for _ in range(E)]
    q2 = [quantize_weight(torch.randn(H, inter, generator=g) / 10, spec) for _ in range(E)]
    args = (torch.stack([q for q, _ in q13]), torch.stack([q for q, _ in q2]))
    scales = (torch.stack([s for _, s in q13]), torch.stack([s for _, s in q2]))
    ids, weights = torch.randint(0, E, (7, 2), generator=g), torch.rand(7, 2, generator=g)
    got = npu_ops.fused_moe(x, *args, weights, ids, *scales, spec)
    want = fused_moe_torch(x, *args, weights, ids, *scales, spec)
    assert torch.allclose(got, want, atol=1e-4)
    assert {"npu_dynamic_quant", "npu_quant_matmul", "npu_grouped_matmul"} <= set(fake.calls)
    from glm45v_npu.kernels.ops import (
        CHECK_KIND,  # scales agreed over ranks: npu_dynamic_quant cannot take them
    )

    assert CHECK_KIND["fused_moe"](x, *args, weights, ids, *scales, spec) is not None
    assert CHECK_KIND["fused_moe"](x, *args, weights, ids, *scales, spec, torch.maximum) is None
    assert CHECK_KIND["quant_linear"](x, wq, ws, b, spec, None, None, None, torch.ones(7)) is None


def test_fp8_on_an_npu_is_dequantized_at_load_with_one_line(vl_fp8, caplog):
    from glm45v_npu.model.glm4v_moe import build_model, dequantize
    from glm45v_npu.model.hf_config import load_config
    from glm45v_npu.model.quantization import read_plan

    with caplog.at_level("WARNING", logger="glm45v_npu"):
        plan = read_plan(vl_fp8, "auto", "npu")
    assert plan.dequantize and "dequantized to float at load" in caplog.text and "2x the memory" in caplog.text
    model = build_model(load_config(vl_fp8), torch.bfloat16, "meta", plan=plan)
    dequantize(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} <= {torch.bfloat16, torch.float32}


def test_quantization_none_holds_fp8_as_floats_and_matches(vl_fp8):
    fp8 = LLM(vl_fp8, block_size=4, kv_cache_gib=0.002, quantization="none")
    assert fp8.engine.runner.model.language_model.layers[1].self_attn.qkv_proj.weight.dtype == torch.float32
    floats = fp8.generate(REQUESTS, GREEDY)
    weight_only = LLM(vl_fp8, block_size=4, kv_cache_gib=0.002)
    assert floats[0].outputs[0].token_ids[:3] == weight_only.generate(REQUESTS, GREEDY)[0].outputs[0].token_ids[:3]


# --- memory plan ------------------------------------------------------------------------------------------------------


def test_memory_plan_for_glm45v_fp8_on_one_h200():
    from rich.console import Console

    from glm45v_npu.apps.info import render_info

    console = Console(width=200, record=True)
    console.print(render_info("glm-4.5v", "cpu", "bfloat16", 1, True, quantization="fp8",
                              device_memory="141GiB"))
    text = console.export_text()
    assert "fp8 (online, per channel)" in text and "weights per device" in text
    gib = float(text.split("weights per device")[1].split("GiB")[0].split()[-1])
    assert 95 < gib < 115  # ~108 GB of 8-bit decoder weights plus float embeddings, lm_head, vision, routers
    assert "KV capacity" in text


# --- bad checkpoints and options: one error each, naming it ----------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_missing_scale_is_named(vl_fp8, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy(vl_fp8, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.language_model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(Glm45vError, match="lacks tensor.*k_proj.weight_scale"):
        LLM(bad, kv_cache_gib=0.002)


def test_a_scale_of_the_wrong_shape_is_named(vl_fp8, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy(vl_fp8, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.language_model.layers.1.self_attn.o_proj.weight_scale"] = torch.ones(3, 1)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(Glm45vError, match=r"o_proj.weight_scale' has shape \[3, 1\]"):
        LLM(bad, kv_cache_gib=0.002)


@pytest.mark.parametrize("change,message", [
    (lambda q: q.update(format="nvfp4-pack-quantized"), "format 'nvfp4-pack-quantized' is not supported"),
    (lambda q: q.update(format="pack-quantized"), "format 'pack-quantized' is not supported"),
    (lambda q: q.update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
    (lambda q: next(iter(q["config_groups"].values()))["weights"].update(num_bits=4), "4 bits"),
    (lambda q: next(iter(q["config_groups"].values()))["weights"].update(strategy="group"), "strategy 'group'"),
])
def test_an_unsupported_scheme_is_named(vl_fp8, tmp_path, change, message):
    bad = _copy(vl_fp8, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    change(cfg["quantization_config"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Glm45vError, match=message):
        LLM(bad, kv_cache_gib=0.002)


def test_fp8_on_an_int8_checkpoint_and_the_cli_say_so(text, tmp_path):
    from typer.testing import CliRunner

    from glm45v_npu.cli import app

    src, model = text
    folder = msmodelslim_folder(model, src, tmp_path / "ms", dynamic=True)
    with pytest.raises(Glm45vError, match="already quantized"):
        LLM(folder, kv_cache_gib=0.002, quantization="fp8")
    result = CliRunner().invoke(app, ["chat", "-p", "hi", "--model", str(folder), "--quantization", "fp8"])
    assert result.exit_code == 2 and "already quantized" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["chat", "-p", "hi", "--model", str(folder), "--quantization", "int4"])
    assert result.exit_code == 2 and "--quantization int4" in result.output


@pytest.mark.slow
def test_fp8_engine_on_the_triton_kernels_equals_the_twin_run(vl_fp8, request):
    """Every op on its Triton kernel (the interpreter here), FP8 GEMMs and FP8 experts included."""
    twin = LLM(vl_fp8, block_size=4, kv_cache_gib=0.002).generate(REQUESTS, GREEDY)
    calls = request.getfixturevalue("triton_kernels")
    _same_run(LLM(vl_fp8, block_size=4, kv_cache_gib=0.002).generate(REQUESTS, GREEDY), twin, 2e-3)
    assert {"quant_linear", "fused_moe"} <= set(calls)


def test_sm80_runs_fp8_weight_only(monkeypatch):
    """FP8 tensor cores start at sm_89: on an A100 the same FP8 weights run with bf16 activations."""
    from glm45v_npu.kernels import _triton
    from glm45v_npu.kernels.quant import weight_only_unless_fp8_dot

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cuda = torch.device("cuda", 0)
    assert not _triton.fp8_dot(cuda)
    assert weight_only_unless_fp8_dot(QuantSpec("fp8", "group", 128), cuda) == QuantSpec("fp8", "none", 128)
    assert weight_only_unless_fp8_dot(QuantSpec("int8", "token"), cuda) == QuantSpec("int8", "token")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert weight_only_unless_fp8_dot(QuantSpec("fp8", "token"), cuda) == QuantSpec("fp8", "token")

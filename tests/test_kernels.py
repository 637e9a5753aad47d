"""Every Triton kernel against its torch twin run in float64 (CPU: Triton's interpreter; GPU: compiled)."""

import pytest
import torch

from glm45v_npu.kernels import ops
from glm45v_npu.kernels.fused_moe import fused_moe_torch, fused_moe_triton
from glm45v_npu.kernels.kv_cache import store_kv_torch, store_kv_triton
from glm45v_npu.kernels.paged_attention import paged_attention_torch, paged_attention_triton
from glm45v_npu.kernels.split_qkv_rmsnorm_rope import split_qkv_rmsnorm_rope_torch
from glm45v_npu.kernels.tiles import MOE, PREFILL, of
from glm45v_npu.model.context import ForwardContext

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
# bfloat16 under Triton's CPU interpreter is slow: those cases run in the slow tier (CI runs both)
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow, id="bfloat16")]


def _f64(xs):
    return [x.double().cpu() if torch.is_tensor(x) else x for x in xs]


def _close(got, want, dtype):
    got, want = got.double().cpu(), want.double()
    assert (got - want).abs().max() <= TOL[dtype] * max(1.0, float(want.abs().max())), float((got - want).abs().max())


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


@pytest.fixture(params=["torch", "triton"])
def kernels(request, monkeypatch):
    """Which implementation the ops dispatch picks (on a CPU, triton runs in Triton's interpreter)."""
    from glm45v_npu.kernels import ops

    monkeypatch.setenv("GLM45V_KERNELS", request.param)
    monkeypatch.setattr(ops, "_cache", {})
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm, q_bias, k_bias", [(False, False, False), (True, False, False), (True, True, True),
                                                  (True, True, False), (True, False, True)])
@pytest.mark.parametrize("T, nq, nkv, hd, rd", [
    (1, 12, 1, 16, 8),      # GQA 12 (GLM-4.5V split 8 ways), half rotary
    (5, 6, 2, 32, 32),      # GQA 3, full rotary
    (33, 4, 4, 64, 16),     # GQA 1, quarter rotary
    (3, 96 // 8, 1, 128, 64),  # GLM-4.5V per-rank shapes
    (4, 6, 2, 24, 12),      # head_dim not a power of two
])
def test_split_qkv_rmsnorm_rope(kernels, dtype, norm, q_bias, k_bias, T, nq, nkv, hd, rd):
    """The fused decode op on the implementation the dispatch picks, against the float64 twin."""
    qkv = _rand(T, (nq + 2 * nkv) * hd, dtype=dtype, scale=2.0)
    angles = _rand(T, rd // 2, scale=3.0, seed=1).float()
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    args = [1e-5 if norm else None, _rand(hd, dtype=dtype, seed=2) if norm else None,
            _rand(hd, dtype=dtype, seed=3) if norm else None, _rand(hd, dtype=dtype, seed=4) if q_bias else None,
            _rand(hd, dtype=dtype, seed=5) if k_bias else None]
    got = ops.impl("split_qkv_rmsnorm_rope", qkv.device)(qkv, sin, cos, nq * hd, nkv * hd, hd, *args)
    want = split_qkv_rmsnorm_rope_torch(*_f64([qkv, sin, cos]), nq * hd, nkv * hd, hd, *_f64(args))
    for g, w in zip(got, want):
        assert g.is_contiguous() and g.dtype == dtype
        _close(g, w, dtype)
    if q_bias != k_bias:  # each bias acts on its own heads only
        other = split_qkv_rmsnorm_rope_torch(*_f64([qkv, sin, cos]), nq * hd, nkv * hd, hd, *_f64(args[:3]), None, None)
        assert torch.equal(other[1 if q_bias else 0], want[1 if q_bias else 0])
        assert not torch.equal(other[0 if q_bias else 1], want[0 if q_bias else 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [(1, 64), (5, 96), (3, 4096)])
def test_rms_norm_and_the_fused_residual_add(dtype, rows, n):
    from glm45v_npu.kernels.reference import rms_norm
    from glm45v_npu.kernels.rms_norm import add_rms_norm_torch, add_rms_norm_triton, rms_norm_triton

    x, r = _rand(rows, n, dtype=dtype), _rand(rows, n, dtype=dtype, seed=1)
    w = (1 + 0.2 * _rand(n, seed=2)).to(dtype)
    _close(rms_norm_triton(x, w, 1e-5), rms_norm(*_f64([x, w]), 1e-5), dtype)
    got, summed = add_rms_norm_triton(x, r, w, 1e-5)
    want, want_sum = add_rms_norm_torch(*_f64([x, r, w]), 1e-5)
    _close(summed, want_sum, dtype)
    _close(got, want, dtype)
    assert torch.equal(summed, _rounded_sum(x, r))  # the residual stream is rounded once, as the unfused add does


def _rounded_sum(x, r):
    """x + r as the kernel should round it: float32 sum, one cast. Triton's CPU interpreter casts float32 to
    bfloat16 by truncation (its cast takes no rounding mode), a GPU rounds to nearest even as torch does."""
    if x.dtype != torch.bfloat16 or x.is_cuda:
        return x + r
    bits = (x.float() + r.float()).view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_store_kv_skips_padding_slots(dtype, block_size):
    T, nkv, hd, blocks = 9, 2, 16, 12
    k, v = _rand(T, nkv, hd, dtype=dtype), _rand(T, nkv, hd, dtype=dtype, seed=1)
    slots = torch.randperm(blocks * block_size, generator=torch.Generator().manual_seed(0))[:T]
    slots[[2, 7]] = -1
    slots = slots.to(DEV)
    caches = [torch.full((blocks, block_size, nkv, hd), 7.0, dtype=dtype, device=DEV) for _ in range(4)]
    store_kv_triton(k, v, caches[0], caches[1], slots)
    store_kv_torch(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert (caches[0] == 7.0).sum() == (blocks * block_size - 7) * nkv * hd


def _paged_case(q_lens, ctx_lens, nq, nkv, hd, bs, dtype, seed=0):
    num_blocks = sum(-(-c // bs) for c in ctx_lens) + 3
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = []
    for c in ctx_lens:
        n = -(-c // bs)
        tables.append(perm[:n])
        perm = perm[n:]
    ctx = ForwardContext.build(q_lens, ctx_lens, tables, bs, DEV).attn
    kc = _rand(num_blocks, bs, nkv, hd, dtype=dtype, seed=seed + 1)
    vc = _rand(num_blocks, bs, nkv, hd, dtype=dtype, seed=seed + 2)
    q = _rand(sum(q_lens), nq, hd, dtype=dtype, seed=seed + 3)
    got = paged_attention_triton(q, kc, vc, ctx, hd**-0.5)
    ctx64 = ForwardContext.build(q_lens, ctx_lens, tables, bs, "cpu").attn
    want = paged_attention_torch(*_f64([q, kc, vc]), ctx64, hd**-0.5)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq, nkv", [(4, 4), (6, 2), (12, 1), (24, 2)])
@pytest.mark.parametrize("bs", [4, pytest.param(16, marks=pytest.mark.slow)])
def test_paged_decode_attention(dtype, nq, nkv, bs):
    # contexts across block boundaries, long ones over several split-K programs, and an empty padding row
    _paged_case([1] * 6, [1, bs, bs + 1, 300, 777, 0], nq, nkv, 32, bs, dtype)


@pytest.mark.parametrize("hd", [24, 48])
def test_attention_with_head_dim_not_a_power_of_two(hd):
    _paged_case([1] * 3, [5, 40, 300], 6, 2, hd, 4, torch.float32)
    _paged_case([7, 20, 1], [7, 29, 12], 6, 2, hd, 4, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq, nkv, hd", [(4, 4, 16), (6, 2, 32), (12, 1, 64)])
@pytest.mark.parametrize("bs", [4, 16])
def test_prefill_attention_with_cached_prefix(dtype, nq, nkv, hd, bs):
    # fresh prompt, prompt after a cached prefix, a chunk inside a long prompt, and a decode row in the batch
    _paged_case([7, 20, 33, 1], [7, 29, 70, 12], nq, nkv, hd, bs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, E, K, H, inter", [
    (1, 8, 2, 48, 24),     # one token: most experts get none
    (13, 6, 3, 64, 16),
    (40, 16, 4, 96, 40),   # dims that are not tile multiples
    (5, 128, 8, 64, 32),   # GLM-4.5V's expert count and top-k
])
def test_fused_moe(dtype, T, E, K, H, inter):
    x = _rand(T, H, dtype=dtype)
    w13 = _rand(E, 2 * inter, H, dtype=dtype, scale=H**-0.5, seed=1)
    w2 = _rand(E, H, inter, dtype=dtype, scale=inter**-0.5, seed=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(DEV)
    ids[ids == 0] = 1  # expert 0 never chosen: an expert with no tokens
    weights = torch.rand(T, K, generator=g).to(DEV)
    got = fused_moe_triton(x, w13, w2, weights, ids)
    want = fused_moe_torch(*_f64([x, w13, w2, weights]), ids.cpu())
    assert got.dtype == dtype
    _close(got, want, dtype)


@pytest.mark.parametrize("T, K, E, block_m", [(1, 8, 128, 32), (9, 3, 4, 16), (64, 8, 160, 32), (700, 8, 128, 64),
                                               (33, 2, 6, 16)])
def test_expert_alignment_kernel_equals_its_twin(T, K, E, block_m):
    """Exactly: the same row for every (token, k) pair, padding rows and tile experts; ids >= E (another rank's
    experts) are never placed."""
    from glm45v_npu.kernels.fused_moe import align_by_expert, align_by_expert_torch

    ids = torch.randint(0, E + 1, (T, K), generator=torch.Generator().manual_seed(T)).to(DEV)
    for got, want in zip(align_by_expert(ids, E, block_m), align_by_expert_torch(ids, E, block_m)):
        assert torch.equal(got.cpu(), want.cpu())


def _table_tiles(table) -> list:
    return sorted({t for rows in table.values() for t in rows.values()}, key=lambda t: t.as_list())


@pytest.mark.parametrize("target", ["cuda", "npu"])
@pytest.mark.parametrize("tile", _table_tiles(MOE), ids=lambda t: "x".join(map(str, t.as_list())))
def test_every_moe_tile_of_the_table_matches_the_twin(tile, target, monkeypatch):
    """Each MoE tile any target may pick (forced here, at a size that leaves most tiles partly empty), with each
    target's weight-tile order and alignment block."""
    from glm45v_npu.kernels import fused_moe

    monkeypatch.setattr(fused_moe, "moe_tile", lambda *a: tile)
    monkeypatch.setattr(fused_moe, "target_of", lambda device: target)
    T, E, K, H, inter = 21, 6, 3, 80, 72
    x, w13, w2 = _rand(T, H), _rand(E, 2 * inter, H, scale=H**-0.5, seed=1), _rand(E, H, inter, scale=inter**-0.5,
                                                                                   seed=2)
    g = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(DEV)
    weights = torch.rand(T, K, generator=g).to(DEV)
    _close(fused_moe_triton(x, w13, w2, weights, ids), fused_moe_torch(*_f64([x, w13, w2, weights]), ids.cpu()),
           torch.float32)


@pytest.mark.parametrize("tile", _table_tiles(PREFILL), ids=lambda t: "x".join(map(str, t.as_list())))
def test_every_prefill_tile_of_the_table_matches_the_twin(tile, monkeypatch):
    from glm45v_npu.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "prefill_tile", lambda *a: tile)
    _paged_case([7, 70, 1], [7, 93, 12], 6, 2, 32, 16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_skips_other_ranks_experts(dtype):
    """Expert-parallel ranks map other ranks' (token, k) pairs to ids >= E: both paths must skip them."""
    T, E, K, H, inter = 9, 4, 3, 48, 24
    x = _rand(T, H, dtype=dtype)
    w13 = _rand(E, 2 * inter, H, dtype=dtype, scale=H**-0.5, seed=1)
    w2 = _rand(E, H, inter, dtype=dtype, scale=inter**-0.5, seed=2)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 2 * E, (T, K), generator=g)
    ids = torch.where(ids >= E, torch.full_like(ids, E), ids).to(DEV)
    weights = torch.rand(T, K, generator=g).to(DEV)
    local = ids < E
    want = fused_moe_torch(*_f64([x, w13, w2]), (weights * local).double().cpu(), torch.where(local, ids, 0).cpu())
    _close(fused_moe_triton(x, w13, w2, weights, ids), want, dtype)
    _close(fused_moe_torch(x, w13, w2, weights, ids), want, dtype)


@pytest.mark.parametrize("E, k, groups, topk_group, renorm, scaling", [
    (128, 8, 1, 1, True, 1.0),    # GLM-4.5V
    (16, 4, 4, 2, True, 1.5),     # group-limited
    (6, 3, 3, 2, False, 2.5),     # no renormalisation, scaling != 1
    (160, 8, 8, 4, True, 2.5),    # GLM-4.5's expert count, wide groups
])
def test_router_matches_twin_and_transformers(E, k, groups, topk_group, renorm, scaling):
    """The fused router (one Triton program per token) equals its twin, and both equal transformers' router
    module given the same gate weights."""
    from transformers import Glm4vMoeTextConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextTopkRouter

    from glm45v_npu.kernels.router import route_torch, route_triton

    T, H = 37, 24
    cfg = Glm4vMoeTextConfig(hidden_size=H, n_routed_experts=E, num_experts_per_tok=k, n_group=groups,
                             topk_group=topk_group, norm_topk_prob=renorm, routed_scaling_factor=scaling)
    ref = Glm4vMoeTextTopkRouter(cfg)
    g = torch.Generator().manual_seed(E + k)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, H, generator=g))
        ref.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    x = torch.randn(T, H, generator=g)
    _, ref_w, ref_ids = ref(x)
    logits = torch.nn.functional.linear(x, ref.weight)
    args = (ref.e_score_correction_bias, k, groups, topk_group, renorm, scaling)
    twin_w, twin_ids = route_torch(logits.double(), *args)
    got_w, got_ids = route_triton(logits.to(DEV), *args)
    order = ref_ids.sort(-1)
    for w, ids in ((twin_w, twin_ids), (got_w.cpu(), got_ids.cpu())):
        assert torch.equal(ids, twin_ids)  # same experts in the same (descending choice) order
        o = ids.sort(-1)
        assert torch.equal(o.values, order.values)
        assert torch.allclose(w.gather(1, o.indices).double(), ref_w.gather(1, order.indices).double(), atol=1e-6)


def _no_specialize(kernel) -> set[str]:
    spec = getattr(kernel, "do_not_specialize", None)
    if spec is None:  # Triton's interpreter keeps the decorator's arguments
        spec = kernel.kwargs.get("do_not_specialize")
    return set(spec or [])


def test_no_per_step_specialisation(monkeypatch):
    """Decode over 300 growing context lengths at every batch size 1..64 (GLM-4.5V's per-rank shapes at TP 8 and
    the tiny model's), through the real launchers with the kernels themselves not run: the distinct constexpr
    tuples per kernel stay within the fixed set of split buckets, MoE and prefill steps of any size within the
    rows of the tile table, and every per-step integer argument (block table width, token counts) is excluded
    from Triton's value specialisation."""
    from collections import defaultdict

    from glm45v_npu.kernels import _triton
    from glm45v_npu.kernels.fused_moe import fused_moe_triton
    from glm45v_npu.kernels.kv_cache import store_kv_triton
    from glm45v_npu.kernels.metadata import AttentionMetadata
    from glm45v_npu.kernels.paged_attention import paged_attention_triton
    from glm45v_npu.kernels.split_qkv_rmsnorm_rope import split_qkv_rmsnorm_rope_triton

    seen = defaultdict(set)
    kernels = {}

    def record(self, *args):
        seen[self.name].add(tuple(sorted(self.constexprs.items())))
        kernels[self.name] = self.kernel

    monkeypatch.setattr(_triton.Launch, "__call__", record)
    bs = 16
    for nq, nkv, hd, rd in ((12, 1, 128, 64), (4, 2, 32, 16)):
        for batch in range(1, 65):
            q = torch.empty(batch, nq, hd)
            caches = [torch.empty(1, bs, nkv, hd) for _ in range(2)]
            qkv = torch.empty(batch, (nq + 2 * nkv) * hd)
            for step in range(300):
                ctx = 1 + 7 * step
                width = -(-ctx // bs)
                meta = AttentionMetadata(torch.arange(batch + 1, dtype=torch.int32),
                                         torch.full((batch,), ctx, dtype=torch.int32),
                                         torch.zeros(batch, width, dtype=torch.int32), batch, 1, ctx, True)
                paged_attention_triton(q, *caches, meta, 0.1)
            split_qkv_rmsnorm_rope_triton(qkv, torch.empty(batch, rd), torch.empty(batch, rd), nq * hd, nkv * hd, hd)
            store_kv_triton(torch.empty(batch, nkv, hd), torch.empty(batch, nkv, hd), *caches,
                            torch.zeros(batch, dtype=torch.int64))
            fused_moe_triton(torch.empty(batch, 64), torch.empty(8, 48, 64), torch.empty(8, 64, 24),
                             torch.ones(batch, 2), torch.zeros(batch, 2, dtype=torch.long))
    buckets = _triton.MAX_SPLITS.bit_length()  # split counts 1, 2, 4, ..., MAX_SPLITS
    shapes = 2
    assert 1 <= len(seen["_decode_kernel"]) <= buckets * shapes
    assert 1 <= len(seen["_reduce_splits_kernel"]) <= buckets * shapes
    for name in ("_split_qkv_rmsnorm_rope_kernel", "_store_kv_kernel"):
        assert len(seen[name]) == shapes, name  # nothing per step: one variant per model shape
    moe_variants = len(seen["_gate_up_kernel"])
    for tokens in (100, 129, 700, 1500, 4096, 9000):  # prefill-sized steps: one variant per row of the table
        fused_moe_triton(torch.empty(tokens, 64), torch.empty(8, 48, 64), torch.empty(8, 64, 24),
                         torch.ones(tokens, 2), torch.zeros(tokens, 2, dtype=torch.long))
    for q_len in range(1, 3000, 37):
        meta = AttentionMetadata(torch.tensor([0, q_len], dtype=torch.int32), torch.tensor([q_len], dtype=torch.int32),
                                 torch.zeros(1, 200, dtype=torch.int32), q_len, q_len, q_len, False)
        paged_attention_triton(torch.empty(q_len, 4, 32), torch.empty(1, bs, 2, 32), torch.empty(1, bs, 2, 32), meta,
                               0.1)
    rows = len(of(MOE, "cuda", "float32"))
    assert 1 <= moe_variants <= 2 and len(seen["_gate_up_kernel"]) == len(seen["_down_kernel"]) == rows
    assert len(seen["_prefill_kernel"]) == len(of(PREFILL, "cuda", "float32"))
    from glm45v_npu.kernels.paged_attention import _prefill_kernel

    assert {"bt_stride"} <= _no_specialize(kernels["_decode_kernel"]) and {"bt_stride"} <= _no_specialize(_prefill_kernel)
    assert {"T"} <= _no_specialize(kernels["_store_kv_kernel"])
    assert {"TK"} <= _no_specialize(kernels["_gate_up_kernel"]) and {"TK"} <= _no_specialize(kernels["_down_kernel"])

"""torch_npu fast paths, each a thin wrapper with its portable twin's signature. ops.py wraps every one in
SelfChecked: it proves itself against the twin on its first real call (per kind of call) and, on disagreement
or error, the portable path serves instead. torch_npu itself is imported by platform.py alone.

Signatures follow Ascend Extension for PyTorch's API reference (hiascend.com, "torch_npu" custom API list,
versions 6.0-7.x); the page of each op is named at its call.
"""

from __future__ import annotations

import torch

from .metadata import AttentionMetadata


def _npu():
    from ..platform import torch_npu_module

    return torch_npu_module()


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    # torch_npu._npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices): ATB ReshapeAndCache;
    # key/value [T, kv_heads, head_dim], caches [blocks, block_size, kv_heads, head_dim], slots int32.
    _npu()._npu_reshape_and_cache(key=k, value=v, key_cache=k_cache, value_cache=v_cache,
                                  slot_indices=slot_mapping.to(torch.int32))


CAUSAL_MASK_SIZE = 2048


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    # torch_npu.npu_fused_infer_attention_score(query, key, value, *, atten_mask, actual_seq_lengths,
    # actual_seq_lengths_kv, block_table, num_heads, scale, input_layout, num_key_value_heads, sparse_mode,
    # block_size) -> (out, lse) (API reference: "torch_npu.npu_fused_infer_attention_score"). Layout "TND":
    # query [T, N, D] with actual_seq_lengths the cumulative query ends; paged key/value [blocks, block_size,
    # kv_heads * D] with block_table [B, max_blocks] int32 and actual_seq_lengths_kv each sequence's length;
    # sparse_mode 3 = causal, aligned to the end of each sequence, from a 2048 x 2048 upper-triangle mask.
    npu = _npu()
    blocks, bs, nkv, hd = k_cache.shape
    out, _ = npu.npu_fused_infer_attention_score(
        q, k_cache.view(blocks, bs, nkv * hd), v_cache.view(blocks, bs, nkv * hd),
        atten_mask=_causal_mask(q.device), block_table=meta.block_tables,
        actual_seq_lengths=meta.host_cu_seqlens_q[1:], actual_seq_lengths_kv=meta.host_context_lens,
        num_heads=q.shape[1], num_key_value_heads=nkv, scale=scale, input_layout="TND", sparse_mode=3,
        block_size=bs)
    return out


_MASKS: dict[torch.device, torch.Tensor] = {}


def _causal_mask(device: torch.device) -> torch.Tensor:
    if device not in _MASKS:
        ones = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
        _MASKS[device] = torch.triu(ones, diagonal=1).to(torch.int8)
    return _MASKS[device]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, bias: torch.Tensor | None = None
             ) -> torch.Tensor:
    # torch_npu.npu_rms_norm(x, gamma, epsilon=1e-06) -> (y, rstd) (API reference: "torch_npu.npu_rms_norm").
    if weight is None:
        weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    y = _npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    return y if bias is None else y + bias


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    # torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06) -> (y, rstd, x) with x = x1 + x2 and y its RMSNorm
    # times gamma (API reference: "torch_npu.npu_add_rms_norm").
    y, _, summed = _npu().npu_add_rms_norm(x, residual, weight, epsilon=eps)
    return y, summed


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # torch_npu.npu_rotary_mul(x, r1, r2) = x * r1 + rotate_half(x) * r2 on 4D [B, S, N, D] with r1, r2
    # broadcastable [1, S, 1, D] (API reference: "torch_npu.npu_rotary_mul"); only the first rotary_dim lanes
    # rotate, the rest pass through (partial rotary).
    rd = cos.shape[-1]
    rot = x[..., :rd].contiguous()[None]
    r1, r2 = cos.to(x.dtype)[None, :, None, :], sin.to(x.dtype)[None, :, None, :]
    out = _npu().npu_rotary_mul(rot, r1, r2)[0]
    return torch.cat([out, x[..., rd:]], dim=-1) if rd < x.shape[-1] else out


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int, renormalize: bool,
          scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    # torch_npu.npu_moe_gating_top_k(x, k, *, bias, k_group, group_count, group_select_mode, renorm, norm_type,
    # out_flag, routed_scaling_factor, eps) -> (y, expert_idx, out) (API reference:
    # "torch_npu.npu_moe_gating_top_k"): norm_type 1 = sigmoid, bias added for the choice only, group_select_mode
    # 1 = groups ranked by the sum of their two best, y = chosen sigmoid scores / (sum + eps) x scaling. It always
    # renormalises, so checkpoints without norm_topk_prob take the portable path.
    if not renormalize:
        raise NotImplementedError("npu_moe_gating_top_k always renormalises")
    y, ids, _ = _npu().npu_moe_gating_top_k(
        logits, top_k, bias=bias.to(logits.dtype), k_group=topk_group, group_count=n_group, group_select_mode=1,
        renorm=0, norm_type=1, out_flag=False, routed_scaling_factor=scaling, eps=1e-20)
    return y.float(), ids.long()


def quant_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, spec,
                 input_scale=None, input_offset=None, quant_bias=None) -> torch.Tensor:
    # msmodelslim W8A8_DYNAMIC. torch_npu.npu_dynamic_quant(input, *, smooth_scales=None) -> (int8 y, float32
    # scale [tokens]) with y = round(x / scale), scale = max|x| / 127 per token (API reference:
    # "torch_npu.npu_dynamic_quant"); torch_npu.npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None,
    # bias=None, output_dtype=None): int8 x1 [M, K] @ int8 x2 [K, N] with int32 accumulation, then * scale [N] *
    # pertoken_scale [M] (API reference: "torch_npu.npu_quant_matmul").
    if spec.weight != "int8" or spec.act != "token":
        raise NotImplementedError("only W8A8_DYNAMIC runs through npu_quant_matmul")
    npu = _npu()
    xq, xs = npu.npu_dynamic_quant(x)
    y = npu.npu_quant_matmul(xq, weight.t(), weight_scale.view(-1).float(), pertoken_scale=xs.view(-1).float(),
                             output_dtype=x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              spec=None) -> torch.Tensor:
    # 1. torch_npu.npu_moe_init_routing_v2(x, expert_idx, *, active_num, expert_num, expert_tokens_num_type,
    #    expert_tokens_num_flag, active_expert_range, quant_mode) -> (expanded_x, expanded_row_idx,
    #    expert_tokens, _) (API reference: "torch_npu.npu_moe_init_routing_v2"): rows sorted by expert (stable),
    #    expanded_row_idx[t * K + k] = that pair's row in expanded_x; count per expert (type 1). Another rank's
    #    pairs (id >= E) go to expert E - 1 with weight 0: a little wasted work, no reliance on dropping modes.
    # 2. torch_npu.npu_grouped_matmul(x_list, weight_list, *, group_list, split_item=2, group_type=0,
    #    group_list_type=1) (API reference: "torch_npu.npu_grouped_matmul"): weight [E, K, N], group sizes.
    # 3. torch_npu.npu_swiglu(x, dim=-1) = silu(first half) * second half.
    # 4. torch_npu.npu_moe_finalize_routing(expanded, skip1, skip2, bias, scales, expanded_src_to_dst_row,
    #    export_for_source_row) (API reference: "torch_npu.npu_moe_finalize_routing"):
    #    out[i] = sum_k scales[i, k] * expanded[src_to_dst[i + k * T]]: k-major, hence the transpose below.
    npu = _npu()
    T, K = topk_ids.shape
    E = w13.shape[0]
    ids = topk_ids.clamp(max=E - 1).to(torch.int32)
    expanded, row_idx, counts, _ = npu.npu_moe_init_routing_v2(
        x, ids, active_num=T * K, expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[0, E], quant_mode=-1)
    counts = counts.to(torch.int64)
    h = _grouped(npu, expanded, w13, w13_scale, spec, counts, x.dtype)
    h = npu.npu_swiglu(h, dim=-1)
    y = _grouped(npu, h, w2, w2_scale, spec, counts, x.dtype)
    local = (topk_ids < E).to(topk_weights.dtype)  # another rank's pairs add nothing here
    k_major = row_idx.view(T, K).t().reshape(-1).to(torch.int32)
    return npu.npu_moe_finalize_routing(y, None, None, None, (topk_weights * local).to(y.dtype), k_major,
                                        ids).to(x.dtype)


def _grouped(npu, a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, spec, counts: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    # torch_npu.npu_grouped_matmul(x, weight, *, scale=None, per_token_scale=None, group_list, split_item,
    # group_type, group_list_type, output_dtype) (API reference: "torch_npu.npu_grouped_matmul"): with int8 x and
    # weight, each expert's int32 product times scale [E, N] and per_token_scale [rows] (W8A8_DYNAMIC experts,
    # their inputs quantized per row by npu_dynamic_quant).
    if spec is None:
        return npu.npu_grouped_matmul([a], [w.transpose(1, 2)], group_list=counts, split_item=2, group_type=0,
                                      group_list_type=1)[0]
    if spec.weight != "int8" or spec.act != "token":
        raise NotImplementedError("only W8A8_DYNAMIC experts run through npu_grouped_matmul")
    aq, a_scale = npu.npu_dynamic_quant(a)
    return npu.npu_grouped_matmul([aq], [w.transpose(1, 2)], scale=[scale[..., 0].float()],
                                  per_token_scale=[a_scale.view(-1).float()], group_list=counts, split_item=2,
                                  group_type=0, group_list_type=1, output_dtype=dtype)[0]

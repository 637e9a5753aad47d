"""A stand-in for torch_npu: each fused op as its API reference documents it, in plain torch, with the
documented argument constraints asserted. Tests wire our wrappers to it to check layouts, dtypes, index
conventions and length lists; whether the real ops match their documents can only be seen on an NPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class FakeTorchNpu:
    def __init__(self):
        self.calls: list[str] = []

    def _npu_reshape_and_cache(self, key, value, key_cache, value_cache, slot_indices):
        self.calls.append("_npu_reshape_and_cache")
        assert slot_indices.dtype == torch.int32 and key.dim() == 3 and key_cache.dim() == 4
        keep = slot_indices >= 0
        rows = slot_indices[keep].long()
        key_cache.view(-1, *key_cache.shape[2:])[rows] = key[keep].to(key_cache.dtype)
        value_cache.view(-1, *value_cache.shape[2:])[rows] = value[keep].to(value_cache.dtype)

    def npu_fused_infer_attention_score(self, query, key, value, *, atten_mask=None, block_table=None,
                                        actual_seq_lengths=None, actual_seq_lengths_kv=None, num_heads=1,
                                        num_key_value_heads=0, scale=1.0, input_layout="BSH", sparse_mode=0,
                                        block_size=0, **unused):
        self.calls.append("npu_fused_infer_attention_score")
        assert input_layout == "TND" and sparse_mode == 3 and atten_mask.shape == (2048, 2048)
        assert atten_mask.dtype in (torch.int8, torch.bool) and block_table.dtype == torch.int32
        assert key.dim() == 3 and key.shape[1] == block_size and query.shape[1] == num_heads
        assert all(isinstance(n, int) for n in [*actual_seq_lengths, *actual_seq_lengths_kv])
        assert list(actual_seq_lengths) == sorted(actual_seq_lengths)  # cumulative ends
        T, N, D = query.shape
        nkv = num_key_value_heads
        out = torch.zeros_like(query)
        start = 0
        for b, end in enumerate(actual_seq_lengths):
            L = actual_seq_lengths_kv[b]
            blocks = block_table[b, : -(-L // block_size)].long()
            k = key[blocks].reshape(-1, nkv, D)[:L].float()
            v = value[blocks].reshape(-1, nkv, D)[:L].float()
            q = query[start:end].float()
            n_q = end - start
            scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(N // nkv, dim=1)) * scale
            allowed = torch.arange(L)[None, :] <= (L - n_q + torch.arange(n_q))[:, None]  # right-down causal
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.repeat_interleave(N // nkv, 1)).to(
                query.dtype)
            start = end
        return out, torch.zeros(1)

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append("npu_rms_norm")
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x.dtype), rstd

    def npu_add_rms_norm(self, x1, x2, gamma, epsilon=1e-6):
        self.calls.append("npu_add_rms_norm")
        assert x1.shape == x2.shape and gamma.shape == x1.shape[-1:]
        x = (x1.float() + x2.float()).to(x1.dtype)
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x1.dtype), rstd, x

    def npu_rotary_mul(self, x, r1, r2):
        self.calls.append("npu_rotary_mul")
        assert x.dim() == 4 and r1.dim() == 4 and r1.shape[-1] == x.shape[-1]
        return x * r1 + _rotate_half(x) * r2

    def npu_moe_gating_top_k(self, x, k, *, bias=None, k_group=1, group_count=1, group_select_mode=0, renorm=0,
                             norm_type=1, out_flag=False, routed_scaling_factor=1.0, eps=1e-20):
        self.calls.append("npu_moe_gating_top_k")
        assert norm_type == 1 and group_select_mode == 1 and bias is not None and bias.dtype == x.dtype
        norm = x.float().sigmoid()
        value = norm + bias.float()
        T, E = x.shape
        if group_count > 1:
            grouped = value.view(T, group_count, -1)
            score = grouped.topk(2, dim=-1)[0].sum(-1)
            keep = score.topk(k_group, dim=-1)[1]
            mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, keep, True)
            value = grouped.masked_fill(~mask[..., None], float("-inf")).view(T, E)
        idx = value.topk(k, dim=-1)[1]
        y = norm.gather(1, idx)
        y = y / (y.sum(-1, keepdim=True) + eps) * routed_scaling_factor
        return y.to(x.dtype), idx.to(torch.int32), norm

    def npu_moe_init_routing_v2(self, x, expert_idx, *, active_num=-1, expert_num=-1, expert_tokens_num_type=0,
                                expert_tokens_num_flag=False, active_expert_range=(), quant_mode=0, **unused):
        self.calls.append("npu_moe_init_routing_v2")
        assert expert_idx.dtype == torch.int32 and quant_mode == -1 and expert_tokens_num_type == 1
        assert list(active_expert_range) == [0, expert_num] and int(expert_idx.max()) < expert_num
        K = expert_idx.shape[1]
        flat = expert_idx.flatten().long()
        order = flat.argsort(stable=True)
        expanded_row_idx = torch.empty_like(order)
        expanded_row_idx[order] = torch.arange(order.numel())
        counts = torch.bincount(flat, minlength=expert_num)
        return x[order // K], expanded_row_idx.to(torch.int32), counts, None

    def npu_grouped_matmul(self, x, weight, *, group_list=None, split_item=0, group_type=-1, group_list_type=0,
                           scale=None, per_token_scale=None, output_dtype=None, **unused):
        self.calls.append("npu_grouped_matmul")
        assert split_item == 2 and group_type == 0 and group_list_type == 1 and len(x) == len(weight) == 1
        (a,), (w,) = x, weight
        assert w.dim() == 3 and w.shape[1] == a.shape[1]  # weight [E, K, N]
        quant = a.dtype == torch.int8
        assert quant == (w.dtype == torch.int8) == (scale is not None) == (per_token_scale is not None)
        out, start = [], 0
        for e, n in enumerate(group_list.tolist()):
            if quant:
                acc = (a[start : start + n].int() @ w[e].int()).float()  # int32 accumulation
                out.append(acc * scale[0][e].float()[None, :] * per_token_scale[0][start : start + n, None])
            else:
                out.append(a[start : start + n].float() @ w[e].float())
            start += n
        return [torch.cat(out).to(output_dtype if quant else a.dtype)]

    def npu_dynamic_quant(self, x, smooth_scales=None):
        self.calls.append("npu_dynamic_quant")
        assert smooth_scales is None and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        scale = x.float().abs().amax(-1) / 127
        scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)
        return torch.round(x.float() / scale[..., None]).clamp(-128, 127).to(torch.int8), scale

    def npu_quant_matmul(self, x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
        self.calls.append("npu_quant_matmul")
        assert x1.dtype == x2.dtype == torch.int8 and x1.shape[1] == x2.shape[0] and scale.shape == (x2.shape[1],)
        assert pertoken_scale is not None and pertoken_scale.shape == (x1.shape[0],) and offset is None
        acc = (x1.int() @ x2.int()).float()  # int32 accumulation
        return (acc * scale.float()[None, :] * pertoken_scale.float()[:, None]).to(output_dtype)

    def npu_swiglu(self, x, dim=-1):
        self.calls.append("npu_swiglu")
        a, b = x.chunk(2, dim=dim)
        return F.silu(a) * b

    def npu_moe_finalize_routing(self, expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                                 export_for_source_row, drop_pad_mode=0):
        self.calls.append("npu_moe_finalize_routing")
        assert expanded_src_to_dst_row.dtype == torch.int32 and expanded_src_to_dst_row.dim() == 1
        T, K = scales.shape
        out = torch.zeros(T, expanded_permuted_rows.shape[1], dtype=torch.float32)
        for k in range(K):
            rows = expanded_src_to_dst_row[k * T : (k + 1) * T].long()  # k-major, as documented
            out += scales[:, k : k + 1].float() * expanded_permuted_rows[rows].float()
        return out.to(expanded_permuted_rows.dtype)

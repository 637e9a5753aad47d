"""Write new K/V rows into the paged cache by slot (slot -1 = padding, not stored)."""

from __future__ import annotations

import torch


def store_kv_torch(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, kv_heads, head_dim]; caches [num_blocks, block_size, kv_heads, head_dim]."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


try:
    import triton
    import triton.language as tl

    from ._triton import Launch, ptr, row_offset, target_of
    from .tiles import fixed
except ImportError:
    triton = None

if triton is not None:

    @triton.jit(do_not_specialize=["T"])
    def _store_kv_kernel(k, v, k_cache, v_cache, slots, k_stride, v_stride, T,
                         ROW: tl.constexpr, BLOCK: tl.constexpr, TOKENS: tl.constexpr):
        """TOKENS tokens per program, each a ROW-wide copy into its slot's row of the cache."""
        i = tl.arange(0, BLOCK)
        m = i < ROW
        for j in range(TOKENS):
            t = tl.program_id(0) * TOKENS + j
            if t < T:
                slot = tl.load(slots + t)
                if slot >= 0:
                    dst = row_offset(slot, ROW)
                    kv = tl.load(k + t.to(tl.int64) * k_stride + i, mask=m)
                    vv = tl.load(v + t.to(tl.int64) * v_stride + i, mask=m)
                    tl.store(k_cache + dst + i, kv.to(k_cache.dtype.element_ty), mask=m)
                    tl.store(v_cache + dst + i, vv.to(v_cache.dtype.element_ty), mask=m)


def store_kv_launch(T: int, row: int, dtype: torch.dtype, cache_dtype: torch.dtype, target: str = "cuda") -> Launch:
    """One program per few tokens (Ascend prefers fewer, longer programs); a decode batch is one or a few."""
    tokens = fixed(target)["store_tokens"]
    return Launch(_store_kv_kernel, (triton.cdiv(T, tokens),),
                  dict(ROW=row, BLOCK=triton.next_power_of_2(row), TOKENS=tokens),
                  dict(k=ptr(dtype), v=ptr(dtype), k_cache=ptr(cache_dtype), v_cache=ptr(cache_dtype),
                       slots=ptr(torch.int64), k_stride="i32", v_stride="i32", T="i32"))


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    T = k.shape[0]
    k2, v2 = k.reshape(T, -1), v.reshape(T, -1)
    launch = store_kv_launch(T, k2.shape[1], k.dtype, k_cache.dtype, target_of(k.device))
    launch(k2, v2, k_cache, v_cache, slot_mapping, k2.stride(0), v2.stride(0), T)

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
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _store_kv_kernel(k, v, k_cache, v_cache, slots, k_stride, v_stride, ROW: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slots + t)
        if slot < 0:
            return
        i = tl.arange(0, BLOCK)
        m = i < ROW
        tl.store(k_cache + slot * ROW + i, tl.load(k + t * k_stride + i, mask=m).to(k_cache.dtype.element_ty), mask=m)
        tl.store(v_cache + slot * ROW + i, tl.load(v + t * v_stride + i, mask=m).to(v_cache.dtype.element_ty), mask=m)


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    T = k.shape[0]
    if T == 0:
        return
    k2, v2 = k.reshape(T, -1), v.reshape(T, -1)
    row = k2.shape[1]
    _store_kv_kernel[(T,)](k2, v2, k_cache, v_cache, slot_mapping, k2.stride(0), v2.stride(0), ROW=row,
                           BLOCK=triton.next_power_of_2(row))

"""Writing new keys and values into their cache pages: token i goes to page ``slot // page_size``, row
``slot % page_size`` of both pools, in one launch; a negative slot skips the token (padding)."""
import contextlib

import torch
import triton
import triton.language as tl

MAX_TILE = 2048  # elements of one program's [BLOCK_H, BLOCK_D] tile per pool: 16 per thread at 4 warps


@triton.jit
def _write_pages_kernel(KNew, VNew, KPool, VPool, SlotMapping, num_heads, page_size,
                        stride_kn, stride_kh, stride_vn, stride_vh,
                        stride_kpp, stride_kps, stride_kph, stride_vpp, stride_vps, stride_vph,
                        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # K/VNew [N, H, D], K/VPool [num_pages, page_size, H, D], all with unit last stride; SlotMapping int64 [N].
    # One program per (token, block of BLOCK_H heads).
    i = tl.program_id(0)
    slot = tl.load(SlotMapping + i)
    if slot < 0:
        return
    page = slot // page_size  # int64 like the slot: page * page stride can pass 2^31
    row = slot % page_size
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_h < num_heads)[:, None] & (offs_d[None, :] < HEAD_DIM)
    i = i.to(tl.int64)
    k = tl.load(KNew + i * stride_kn + (offs_h * stride_kh)[:, None] + offs_d[None, :], mask=ok)
    v = tl.load(VNew + i * stride_vn + (offs_h * stride_vh)[:, None] + offs_d[None, :], mask=ok)
    k_dst = KPool + page * stride_kpp + row * stride_kps + (offs_h * stride_kph)[:, None] + offs_d[None, :]
    v_dst = VPool + page * stride_vpp + row * stride_vps + (offs_h * stride_vph)[:, None] + offs_d[None, :]
    tl.store(k_dst, k.to(KPool.dtype.element_ty), mask=ok)
    tl.store(v_dst, v.to(VPool.dtype.element_ty), mask=ok)


def write_pages(k_new, v_new, k_pool, v_pool, slot_mapping) -> None:
    """Copies ``k_new`` / ``v_new`` ``[N, H_kv, D]`` into ``k_pool`` / ``v_pool`` ``[num_pages, page_size, H_kv, D]``
    at ``slot_mapping`` (int64 ``[N]``, ``page * page_size + row``); tokens with a negative slot are skipped."""
    tokens, num_heads, head_dim = k_new.shape
    if tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, MAX_TILE // block_d))
    grid = (tokens, triton.cdiv(num_heads, block_h))
    with torch.cuda.device(k_new.device) if k_new.is_cuda else contextlib.nullcontext():
        _write_pages_kernel[grid](
            k_new, v_new, k_pool, v_pool, slot_mapping, num_heads, k_pool.shape[1],
            k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
            HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
        )

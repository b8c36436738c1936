"""Keys and values in cache pages. Writing: token i goes to page ``slot // page_size``, row ``slot % page_size`` of
both pools, in one launch; a negative slot skips the token (padding). Appending (flash-attn's ``k``/``v`` given to
``attention_with_kvcache``): the same copy, each token's slot computed in the kernel from the block table and the
cached lengths. Reading: the ``@triton.jit`` helpers with which the prefill and decode kernels find a key tile's
pages and load its K or V (the same masks in both)."""
import contextlib

import torch
import triton
import triton.language as tl

from . import dependent_launch, launch

MAX_TILE = 2048  # elements of one program's [BLOCK_H, BLOCK_D] tile per pool: 16 per thread at 4 warps
# Pools spanning at least this many elements from their base address their keys with 64-bit offsets, smaller ones
# with 32-bit offsets (a gathered key's address is then a few integer instructions fewer). Tests lower it to check
# the wide path.
WIDE_POOL_ELEMENTS = 2**31


def wide_offsets(*pools) -> bool:
    """Whether a kernel reading these page pools needs 64-bit offsets (``page_ids``' WIDE): the farthest element from
    a pool's base, through its strides (a view such as one half of an interleaved K/V pool spans more than its
    numel), is ``WIDE_POOL_ELEMENTS`` or more away."""
    return max(sum((n - 1) * s for n, s in zip(pool.shape, pool.stride())) + 1
               for pool in pools) >= WIDE_POOL_ELEMENTS


@triton.jit
def page_ids(bt_row, cols, ok, stride_btp, PAGE_SIZE: tl.constexpr, WIDE: tl.constexpr):
    """The pages of key positions ``cols``, a scalar or a vector, through a block-table row of column stride
    ``stride_btp``; 0 where ``ok`` is false. int64 when WIDE (a page times the page stride passes 2^31 in pools of
    ``WIDE_POOL_ELEMENTS``), else the table's int32."""
    ids = tl.load(bt_row + (cols // PAGE_SIZE) * stride_btp, mask=ok, other=0)
    if WIDE:
        ids = ids.to(tl.int64)
    return ids


@triton.jit
def kv_tile(ptrs, cols, k_len, offs_d, MASKED: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A K or V tile through pointers: masked tiles zero the keys at ``cols >= k_len``, padded head dims zero their
    columns."""
    d_ok = offs_d[None, :] < HEAD_DIM
    if MASKED:
        kv_ok = (cols < k_len)[:, None]
        if PAD_D:
            kv_ok = kv_ok & d_ok
        return tl.load(ptrs, mask=kv_ok, other=0.0)
    elif PAD_D:
        return tl.load(ptrs, mask=d_ok, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store_token(KNew, VNew, KPool, VPool, k_row, v_row, page, row, num_heads, stride_kh, stride_vh,
                 stride_kpp, stride_kps, stride_kph, stride_vpp, stride_vps, stride_vph,
                 HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Copies one token's K and V (at element offsets ``k_row`` / ``v_row`` of KNew / VNew), the heads of this
    program's block (``program_id(1)``), into row ``row`` of page ``page`` (int64: page * page stride can pass 2^31)
    of the pools."""
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_h < num_heads)[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(KNew + k_row + (offs_h * stride_kh)[:, None] + offs_d[None, :], mask=ok)
    v = tl.load(VNew + v_row + (offs_h * stride_vh)[:, None] + offs_d[None, :], mask=ok)
    k_dst = KPool + page * stride_kpp + row * stride_kps + (offs_h * stride_kph)[:, None] + offs_d[None, :]
    v_dst = VPool + page * stride_vpp + row * stride_vps + (offs_h * stride_vph)[:, None] + offs_d[None, :]
    tl.store(k_dst, k.to(KPool.dtype.element_ty), mask=ok)
    tl.store(v_dst, v.to(VPool.dtype.element_ty), mask=ok)


@triton.jit
def _write_pages_kernel(KNew, VNew, KPool, VPool, SlotMapping, num_heads, page_size,
                        stride_kn, stride_kh, stride_vn, stride_vh,
                        stride_kpp, stride_kps, stride_kph, stride_vpp, stride_vps, stride_vph,
                        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    # K/VNew [N, H, D], K/VPool [num_pages, page_size, H, D], all with unit last stride; SlotMapping int64 [N].
    # One program per (token, block of BLOCK_H heads).
    if PDL:  # launched early (``dependent_launch``): the new keys and values must be stored
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    i = tl.program_id(0)
    slot = tl.load(SlotMapping + i)
    if slot < 0:
        return
    i = i.to(tl.int64)
    _store_token(KNew, VNew, KPool, VPool, i * stride_kn, i * stride_vn, slot // page_size, slot % page_size,
                 num_heads, stride_kh, stride_vh, stride_kpp, stride_kps, stride_kph, stride_vpp, stride_vps,
                 stride_vph, HEAD_DIM, BLOCK_H, BLOCK_D)


@triton.jit
def _append_pages_kernel(KNew, VNew, KPool, VPool, BlockTable, CacheSeqlens, QStart, batch, seqlen_new, num_heads,
                         page_size, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_btb,
                         stride_btp, stride_kpp, stride_kps, stride_kph, stride_vpp, stride_vps, stride_vph,
                         PACKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                         PDL: tl.constexpr):
    # Token t of sequence b goes to position CacheSeqlens[b] + t of that sequence's pages (BlockTable [B, max_pages]).
    # K/VNew [B, seqlen_new, H, D], or (PACKED) [total, H, D] with sequence b's tokens from QStart[b] on (QStart
    # non-decreasing, every token in some sequence). One program per (new token, block of BLOCK_H heads): a token's
    # slot is computed here, not in separate launches before this one.
    if PDL:  # launched early (``dependent_launch``): the new keys and values must be stored
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    i = tl.program_id(0)
    if PACKED:  # the token's sequence: the last one starting at or before it (binary search over the starts)
        lo = i * 0  # tensors from the start: loop-carried values keep one type
        hi = lo + batch - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            before = tl.load(QStart + mid) <= i
            lo = tl.where(before, mid, lo)
            hi = tl.where(before, hi, mid - 1)
        b = lo
        t = i - tl.load(QStart + b)
        token = i.to(tl.int64)
    else:
        b = i // seqlen_new
        t = i % seqlen_new
        token = t.to(tl.int64)
    position = tl.load(CacheSeqlens + b) + t
    page = tl.load(BlockTable + b.to(tl.int64) * stride_btb + (position // page_size) * stride_btp).to(tl.int64)
    b = b.to(tl.int64)
    _store_token(KNew, VNew, KPool, VPool, b * stride_kb + token * stride_kn, b * stride_vb + token * stride_vn,
                 page, position % page_size, num_heads, stride_kh, stride_vh, stride_kpp, stride_kps,
                 stride_kph, stride_vpp, stride_vps, stride_vph, HEAD_DIM, BLOCK_H, BLOCK_D)


def _launch_copy(kernel, tokens, k_new, v_new, k_pool, v_pool, *args, **constants):
    """Launches a token-copy kernel: one program per (token, block of heads: all of a token's, up to ``MAX_TILE``
    elements); ``args`` go between the pools and the pools' strides."""
    num_heads, head_dim = k_new.shape[-2:]
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, MAX_TILE // block_d))
    pdl = dependent_launch(k_new.device)
    with torch.cuda.device(k_new.device) if k_new.is_cuda else contextlib.nullcontext():
        launch(kernel, (tokens, triton.cdiv(num_heads, block_h)), k_new, v_new, k_pool, v_pool, *args,
               k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1),
               v_pool.stride(2), **constants, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, PDL=pdl,
               num_warps=4, launch_pdl=pdl)


def write_pages(k_new, v_new, k_pool, v_pool, slot_mapping) -> None:
    """Copies ``k_new`` / ``v_new`` ``[N, H_kv, D]`` into ``k_pool`` / ``v_pool`` ``[num_pages, page_size, H_kv, D]``
    at ``slot_mapping`` (int64 ``[N]``, ``page * page_size + row``); tokens with a negative slot are skipped."""
    if k_new.shape[0]:
        _launch_copy(_write_pages_kernel, k_new.shape[0], k_new, v_new, k_pool, v_pool, slot_mapping,
                     k_new.shape[1], k_pool.shape[1], k_new.stride(0), k_new.stride(1), v_new.stride(0),
                     v_new.stride(1))


def append_pages(k_new, v_new, k_pool, v_pool, block_table, cache_seqlens, q_start) -> None:
    """Writes new tokens at positions ``cache_seqlens[b]``, ``+ 1``, ... of each sequence's pages (``block_table``
    ``[B, max_pages]`` into the pools ``[num_pages, page_size, H_kv, D]``), slots computed in the kernel:
    ``k_new`` / ``v_new`` ``[B, N, H_kv, D]``, or packed ``[total, H_kv, D]`` with sequence b's tokens from
    ``q_start[b]`` on (``q_start`` None: not packed). The caller has checked that every position has a page."""
    packed = q_start is not None
    tokens = k_new.shape[0] if packed else k_new.shape[0] * k_new.shape[1]
    if tokens == 0:
        return
    # Packed rows carry no batch stride: a token's row is its index in the packed tensor. Unpacked, QStart is unread
    # (cache_seqlens stands in for the pointer).
    k_strides = (0, *k_new.stride()[:2]) if packed else k_new.stride()[:3]
    v_strides = (0, *v_new.stride()[:2]) if packed else v_new.stride()[:3]
    _launch_copy(_append_pages_kernel, tokens, k_new, v_new, k_pool, v_pool, block_table, cache_seqlens,
                 q_start if packed else cache_seqlens, block_table.shape[0], 0 if packed else k_new.shape[1],
                 k_new.shape[-2], k_pool.shape[1], *k_strides, *v_strides, *block_table.stride(), PACKED=packed)

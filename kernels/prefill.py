"""Tiled exact attention forward (FlashAttention-2 style): varlen, bottom-right causal, sliding window, softcap,
GQA, paged K/V, log-sum-exp out. S x S is never materialised: each program owns BLOCK_M query rows of one head and
streams K/V tiles of BLOCK_N keys through an online softmax kept in float32, in the log2 domain (its steps, shared
with decode, are in ``softmax_state``).

On Hopper (sm90) the 16-bit case of head dim 64, 128 or 256 without window or soft-cap goes to ``prefill_sm90``
(Gluon, asynchronous MMAs; dense K/V, or pages of 32 keys or more (16 at D128 and D256) that split its key tiles evenly
or hold whole ones). Of the rest, the dense case over long sequences (16-bit, contiguous K/V, head dim 64 or 128,
TMA-aligned strides) runs the same kernel on its TMA path: tiles move through tensor descriptors (bulk copies into
shared memory, no address arithmetic or load masks in registers), in larger tiles, with the key loop optionally
warp-specialized (producer warps issue the copies, the others do the math). ``tma_path`` says which calls take it."""
import contextlib
import contextvars
import functools

import torch
import triton
import triton.language as tl

from . import (INTERPRET, batch_stride, device_properties, dot_extent, launch, prefill_sm90, tile_config,
               tma_aligned)
from .paged_kv import kv_tile, page_ids, wide_offsets
from .softmax_state import LOG2E, online_softmax_fold, pv_accumulate, qk_scores, softmax_output

# (BLOCK_M, BLOCK_N, num_warps, num_stages) keyed by (head-dim bucket, fp32 inputs, GPU major version); the bucket is
# the padded tile width (<= 64, 128, 256). A missing major falls back to its sm80 row. Picked from compiled register
# and shared-memory use (no spills in the unmasked loop where a config allows it; sm8x rows fit the 99 KiB of sm86 /
# sm89); scripts/tune_prefill.py times the candidates on a GPU. fp32 runs 3-pass TF32 dots: about twice the registers.
CONFIGS = {
    (64, False, 8): (128, 64, 4, 3),
    (128, False, 8): (128, 64, 8, 3),
    (256, False, 8): (64, 32, 4, 2),
    (64, True, 8): (64, 32, 4, 2),
    (128, True, 8): (32, 32, 4, 2),
    (256, True, 8): (16, 32, 4, 1),
    (64, False, 9): (64, 64, 4, 3),  # H100, scripts/tune_prefill.py 2026-11-23: best mean causal+full
    (128, False, 9): (128, 64, 8, 4),  # H100: 510 TFLOP/s causal S=16k (SDPA flash 329)
    (256, False, 9): (64, 32, 4, 2),
    (64, True, 9): (64, 32, 4, 2),
    (128, True, 9): (64, 16, 4, 2),
    (256, True, 9): (16, 32, 4, 1),
}
# The interpreter runs numpy per program: small tiles keep several query and key tiles in the tests' short sequences,
# so every stage of the KV loop is exercised.
INTERPRET_CONFIG = (32, 16, 4, 1)

# The TMA path's (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize) on sm90 for 16-bit inputs, keyed by head
# dim (the only ones it takes: TMA needs no padded columns then, and these are the tuned ones). Candidates were
# compiled for sm90 with Triton 3.6 offline (registers, spills, shared memory: see scripts/tune_prefill.py); these
# rows are the best mean of causal and full at S = 8k and 16k, the lengths that take this path, on an H200
# (tune_prefill.py, 2026-12-02). No warp-specialized candidate won at any length.
TMA_CONFIGS = {
    64: (64, 64, 4, 3, False),
    128: (128, 128, 8, 3, False),
}
# Calls with shorter query sequences keep the pointer kernel: each TMA program first writes its four descriptors to
# global memory and fences them, which a short key loop does not pay back. H200, bf16, 16k tokens a call, TFLOP/s
# TMA / pointer at S = 1k, 2k, 4k, 8k, 16k: D128 causal 224/260, 317/339, 391/395, 452/384, 501/420; D64 causal
# 205/255, 286/321, 349/361, 384/392, 398/386 (full: D64 429/388 at 8k).
TMA_MIN_SEQLEN_Q = 8192
TMA_HEAD_DIMS = tuple(TMA_CONFIGS)
TMA_DTYPES = (torch.float16, torch.bfloat16)
INTERPRET_TMA_CONFIG = (32, 16, 4, 1, False)  # the interpreter ignores warp_specialize (tl.range's hints)
# The interpreter runs no sm90: tests set this to send the calls that qualify down the TMA path there.
INTERPRET_AS_SM90 = False


@triton.jit
def _page_ids(bt_row, start_n, offs_n, k_len, PAGE_SIZE: tl.constexpr, WIDE: tl.constexpr,
              TILE_IN_PAGE: tl.constexpr):
    """Pages of the key tile at start_n: one when the tile lies in one page, else one per key (0 past k_len)."""
    if TILE_IN_PAGE:
        ids = page_ids(bt_row, start_n, start_n < k_len, 1, PAGE_SIZE, WIDE)
    else:
        cols = start_n + offs_n
        ids = page_ids(bt_row, cols, cols < k_len, 1, PAGE_SIZE, WIDE)
    return ids


@triton.jit
def _attend_range(acc, l_i, m_i, q, K, V, bt_row, lo, hi, rows, k_len, k_row0, diag_right, diag_left,
                  stride_kn, stride_kp, stride_vn, stride_vp, qk_scale, cap_scale, cap_log2, offs_n, offs_d,
                  PAGE_SIZE: tl.constexpr, WIDE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr,
                  TILE_IN_PAGE: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST_DOT: tl.constexpr,
                  DOT_PREC: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Folds keys [lo, hi) into the running (acc, l_i, m_i). MASKED tiles apply bounds, causal and window masks;
    unmasked tiles are known to be fully visible to every row of the tile and skip all mask arithmetic. TMA: K and V
    are tensor descriptors of this sequence's keys for the tile's KV head (see ``_prefill_kernel``), whose rows past
    k_len load as zeros; otherwise pointers (PAGED: page pools) and the loads mask those rows themselves.
    TILE_IN_PAGE: pages hold whole key tiles (PAGE_SIZE a multiple of BLOCK_N)."""
    tl.static_assert(not (TMA and (PAGED or PAD_D)), "TMA tiles are whole rows of contiguous keys")
    tl.static_assert(PAGED or not TILE_IN_PAGE, "TILE_IN_PAGE describes page pools")
    tl.static_assert(TMA or not WARP_SPECIALIZE, "warp specialization splits TMA producers from the math warps")
    # Unmasked, without soft-cap: the fold applies the scale in its exponent (qk * qk_scale - m, one fma per score).
    DEFER_SCALE: tl.constexpr = not MASKED and not HAS_SOFTCAP
    # Paged: a tile's page ids are read one iteration ahead, so that no tile's addresses wait on a load of their own
    # iteration; Triton's pipeliner then keeps num_stages tiles in flight as over a contiguous cache (read in the
    # tile's own iteration, the copies of the next tile were issued after the math and awaited at once).
    if PAGED:
        next_page = _page_ids(bt_row, lo, offs_n, k_len, PAGE_SIZE, WIDE, TILE_IN_PAGE)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = start_n + offs_n
        if PAGED:
            page = next_page
            next_page = _page_ids(bt_row, start_n + BLOCK_N, offs_n, k_len, PAGE_SIZE, WIDE, TILE_IN_PAGE)
        if TMA:
            k = K.load([start_n, 0])
        else:
            if TILE_IN_PAGE:
                # The tile is rows of one page: the addressing of a contiguous cache from its base.
                k_ptrs = (K + page * stride_kp + (start_n % PAGE_SIZE) * stride_kn + (offs_n * stride_kn)[:, None]
                          + offs_d[None, :])
                v_ptrs = (V + page * stride_vp + (start_n % PAGE_SIZE) * stride_vn + (offs_n * stride_vn)[:, None]
                          + offs_d[None, :])
            elif PAGED:
                # Gather BLOCK_N logical keys through the block table, whatever the page size.
                slot = cols % PAGE_SIZE
                k_ptrs = K + (page * stride_kp + slot * stride_kn)[:, None] + offs_d[None, :]
                v_ptrs = V + (page * stride_vp + slot * stride_vn)[:, None] + offs_d[None, :]
            else:
                row = (k_row0 + start_n).to(tl.int64)  # int64: packed varlen rows times the row stride can pass 2^31
                k_ptrs = K + row * stride_kn + (offs_n * stride_kn)[:, None] + offs_d[None, :]
                v_ptrs = V + row * stride_vn + (offs_n * stride_vn)[:, None] + offs_d[None, :]
            k = kv_tile(k_ptrs, cols, k_len, offs_d, MASKED, PAD_D, HEAD_DIM)
        qk = qk_scores(q, k, qk_scale, cap_scale, cap_log2, HAS_SOFTCAP, DEFER_SCALE, UPCAST_DOT, DOT_PREC)
        if MASKED:
            keep = cols[None, :] < k_len  # TMA's zero keys past k_len score 0: they are masked here too
            if HAS_RIGHT:
                keep = keep & (cols[None, :] <= rows[:, None] + diag_right)
            if HAS_LEFT:
                keep = keep & (cols[None, :] >= rows[:, None] + diag_left)
            qk = tl.where(keep, qk, float("-inf"))
        # A masked tile can leave a row with no visible key so far (padded rows, the window's left edge): m = -inf.
        acc, l_i, m_i, p = online_softmax_fold(acc, l_i, m_i, qk, qk_scale, DEFER_SCALE, GUARD_EMPTY=MASKED)
        if TMA:
            v = V.load([start_n, 0])
        else:
            v = kv_tile(v_ptrs, cols, k_len, offs_d, MASKED, PAD_D, HEAD_DIM)
        acc = pv_accumulate(acc, p, v, UPCAST_DOT, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(Q, K, V, Out, Lse, BlockTable, q_start_ptr, q_len_ptr, k_start_ptr, k_len_ptr,
                    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                    stride_lb, stride_lh, stride_ls, stride_btb,
                    num_heads, group, num_m_tiles, window_left, window_right,
                    qk_scale, cap_scale, cap_log2,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE_SIZE: tl.constexpr, WIDE: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr, TILE_IN_PAGE: tl.constexpr,
                    UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    # Layouts (element strides, last dim contiguous):
    #   Q / Out   [B, Sq, Hq, D]; sequence b owns rows q_start[b] .. q_start[b] + q_len[b] - 1 (batch stride may be 0)
    #   K / V     [B, Sk, Hkv, D] rows k_start[b] ..; or, PAGED, pools [num_pages, PAGE_SIZE, Hkv, D] with logical
    #             key j of sequence b at page BlockTable[b, j // PAGE_SIZE], row j % PAGE_SIZE
    #   Lse       [B, Hq, Sq] float32, natural log
    # One program per (batch * head, query tile); tiles of one head are adjacent in launch order so concurrently
    # running programs share K/V in L2.
    # TMA (sm90 path, see ``prefill``): Q, K, V and Out move through tensor descriptors of one sequence's rows for one
    # head, made here: a descriptor's shape ends at the sequence's length, so TMA zero-fills the rows past it on loads
    # and drops them on stores, and no tile needs a bounds mask on its loads.
    pid = tl.program_id(0)
    bh = pid // num_m_tiles
    m_tile = pid % num_m_tiles
    if HAS_RIGHT:
        m_tile = num_m_tiles - 1 - m_tile  # causal: the longest tiles first, for a shorter tail
    b = bh // num_heads
    h = bh % num_heads
    q_len = tl.load(q_len_ptr + b)
    start_m = m_tile * BLOCK_M
    tile_empty = start_m >= q_len  # max_seqlen_q's tiles past this sequence's queries
    if not WARP_SPECIALIZE:  # (Triton 3.6's sm90 warp specialization fails on kernels that return early)
        if tile_empty:
            return
    q_row0 = tl.load(q_start_ptr + b)
    k_len = tl.load(k_len_ptr + b)
    kv_head = (h // group).to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    rows = start_m + offs_m  # query index within the sequence
    row_ok = rows < q_len
    q_seq = b64 * stride_qb + q_row0.to(tl.int64) * stride_qs + h64 * stride_qh  # row 0 of the sequence, head h
    # A tensor map needs every dimension >= 1: an empty sequence's (only the warp-specialized kernel, which cannot
    # return early, gets this far with one) is one row long, and its tiles start past that row, so loads give zeros
    # and stores write nothing.
    tma_rows = tl.maximum(q_len, 1)
    tma_start_m = tl.where(q_len == 0, BLOCK_M, start_m)
    if TMA:
        q_tiles = tl.make_tensor_descriptor(Q + q_seq, [tma_rows, HEAD_DIM], [stride_qs, 1], [BLOCK_M, HEAD_DIM])
        q = q_tiles.load([tma_start_m, 0])
    else:
        q_ptrs = Q + q_seq + start_m.to(tl.int64) * stride_qs + (offs_m * stride_qs)[:, None] + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    # Query i sees key j iff diag_left <= j - i <= diag_right (bottom-right aligned).
    diag = k_len - q_len
    diag_right = diag + window_right
    diag_left = diag - window_left
    last_row = tl.minimum(start_m + BLOCK_M, q_len) - 1
    # KV range of the tile [lo, hi); lo on a BLOCK_N boundary.
    lo = 0
    if HAS_LEFT:
        lo = (tl.maximum(start_m + diag_left, 0) // BLOCK_N) * BLOCK_N
    hi = k_len
    if HAS_RIGHT:
        hi = tl.minimum(k_len, last_row + diag_right + 1)
    # Keys [mid_lo, mid_hi) are visible to every row of the tile: no masks there. Both ends on BLOCK_N boundaries.
    mid_lo = lo
    if HAS_LEFT:
        mid_lo = tl.maximum(tl.cdiv(tl.maximum(last_row + diag_left, 0), BLOCK_N) * BLOCK_N, lo)
    mid_hi = k_len
    if HAS_RIGHT:
        mid_hi = tl.minimum(mid_hi, start_m + diag_right + 1)
    mid_hi = (tl.maximum(mid_hi, 0) // BLOCK_N) * BLOCK_N
    none_full = mid_hi <= mid_lo  # no fully visible tile: mask the whole range
    hi = tl.where(tile_empty, lo, hi)  # nothing to attend (the stores below are masked or clipped too)
    mid_lo = tl.where(none_full, lo, mid_lo)
    mid_hi = tl.where(none_full, lo, mid_hi)

    if PAGED:
        K += kv_head * stride_kh
        V += kv_head * stride_vh
        bt_row = BlockTable + b64 * stride_btb
        k_row0 = 0
    else:
        K += b64 * stride_kb + kv_head * stride_kh
        V += b64 * stride_vb + kv_head * stride_vh
        bt_row = BlockTable
        k_row0 = tl.load(k_start_ptr + b)
        if TMA:  # K and V become descriptors of the sequence's keys: key j is their row j
            # (at least one row, as above: with no key the loops load no tile)
            K = tl.make_tensor_descriptor(K + k_row0.to(tl.int64) * stride_ks, [tl.maximum(k_len, 1), HEAD_DIM],
                                          [stride_ks, 1], [BLOCK_N, HEAD_DIM])
            V = tl.make_tensor_descriptor(V + k_row0.to(tl.int64) * stride_vs, [tl.maximum(k_len, 1), HEAD_DIM],
                                          [stride_vs, 1], [BLOCK_N, HEAD_DIM])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WARP_SPECIALIZE:
        # Triton 3.6 warp-specializes (sm90) a kernel's only key loop, without branches inside: one loop, every tile
        # masked; the tuner weighs that against the unspecialized loops below, which skip the masks where they can.
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, K, V, bt_row, lo, hi, rows, k_len, k_row0, diag_right, diag_left, stride_ks, stride_kb,
            stride_vs, stride_vb, qk_scale, cap_scale, cap_log2, offs_n, offs_d, PAGE_SIZE, WIDE, BLOCK_N,
            True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, PAGED, TILE_IN_PAGE, PAD_D, HEAD_DIM, UPCAST_DOT, DOT_PREC, TMA,
            WARP_SPECIALIZE)
    else:
        if HAS_LEFT:  # window's left edge: masked
            acc, l_i, m_i = _attend_range(
                acc, l_i, m_i, q, K, V, bt_row, lo, mid_lo, rows, k_len, k_row0, diag_right, diag_left, stride_ks,
                stride_kb, stride_vs, stride_vb, qk_scale, cap_scale, cap_log2, offs_n, offs_d, PAGE_SIZE, WIDE,
                BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, PAGED, TILE_IN_PAGE, PAD_D, HEAD_DIM, UPCAST_DOT,
                DOT_PREC, TMA, False)
        acc, l_i, m_i = _attend_range(  # fully visible tiles: no masks
            acc, l_i, m_i, q, K, V, bt_row, mid_lo, mid_hi, rows, k_len, k_row0, diag_right, diag_left, stride_ks,
            stride_kb, stride_vs, stride_vb, qk_scale, cap_scale, cap_log2, offs_n, offs_d, PAGE_SIZE, WIDE, BLOCK_N,
            False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, PAGED, TILE_IN_PAGE, PAD_D, HEAD_DIM, UPCAST_DOT, DOT_PREC, TMA,
            False)
        # Diagonal / window's right edge / ragged last key tile: masked.
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, K, V, bt_row, mid_hi, hi, rows, k_len, k_row0, diag_right, diag_left, stride_ks,
            stride_kb, stride_vs, stride_vb, qk_scale, cap_scale, cap_log2, offs_n, offs_d, PAGE_SIZE, WIDE, BLOCK_N,
            True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, PAGED, TILE_IN_PAGE, PAD_D, HEAD_DIM, UPCAST_DOT, DOT_PREC, TMA,
            False)

    out, lse = softmax_output(acc, l_i, m_i)  # rows that saw no key: out 0, lse -inf
    out = out.to(Out.dtype.element_ty)
    o_seq = b64 * stride_ob + q_row0.to(tl.int64) * stride_os + h64 * stride_oh
    if TMA:
        o_tiles = tl.make_tensor_descriptor(Out + o_seq, [tma_rows, HEAD_DIM], [stride_os, 1], [BLOCK_M, HEAD_DIM])
        o_tiles.store([tma_start_m, 0], out)  # rows past q_len are dropped
    else:
        o_ptrs = Out + o_seq + start_m.to(tl.int64) * stride_os + (offs_m * stride_os)[:, None] + offs_d[None, :]
        tl.store(o_ptrs, out, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    l_base = b64 * stride_lb + h64 * stride_lh + (q_row0 + start_m).to(tl.int64) * stride_ls
    tl.store(Lse + l_base + offs_m * stride_ls, lse, mask=row_ok)


def tma_path(q, k, v, out, max_seqlen_q, block_table=None):
    """Whether ``prefill`` takes the TMA path for these tensors: an sm90 GPU (or the interpreter with
    ``INTERPRET_AS_SM90``), 16-bit inputs, K/V not paged, a head dim of ``TMA_HEAD_DIMS``, a longest query sequence
    ``max_seqlen_q`` of at least ``TMA_MIN_SEQLEN_Q``, and Q, K, V and out at 16-byte aligned addresses with 16-byte
    aligned strides (each sequence's and head's descriptor starts at an offset made of them)."""
    if (block_table is not None or q.dtype not in TMA_DTYPES or q.shape[-1] not in TMA_HEAD_DIMS
            or max_seqlen_q < TMA_MIN_SEQLEN_Q):
        return False
    if not (INTERPRET_AS_SM90 if INTERPRET else device_properties(q.device).major == 9):
        return False
    return all(tma_aligned(t, (batch_stride(t), *t.stride()[1:-1])) for t in (q, k, v, out))


def _descriptor_scratch(device):
    """Triton's allocator for the global memory where ``tl.make_tensor_descriptor`` writes each program's descriptors
    at launch: a torch allocation on ``device`` (stream-ordered, and from the graph's pool under CUDA-graph capture)."""
    return lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)


def prefill(q, k, v, out, lse, q_start, q_len, k_start, k_len, max_seqlen_q, *,
            softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
            block_table=None) -> None:
    """Attention of every sequence's queries over its keys, written into ``out`` ``[B, Sq, Hq, D]`` and ``lse``
    ``[B, Hq, Sq]`` (see ``hf_flash.kernels`` for layouts and semantics)."""
    sm90 = prefill_sm90.sm90_path(q, k, v, out, causal=causal, window_left=window_left, window_right=window_right,
                                  softcap=softcap, softmax_scale=softmax_scale, block_table=block_table)
    if sm90 and prefill_sm90.prefill_sm90(q, k, v, out, lse, q_start, q_len, k_start, k_len, max_seqlen_q,
                                          softmax_scale=softmax_scale, causal=causal, block_table=block_table):
        return  # (False: this Triton could not compile it, which it said)
    batch, (num_heads, head_dim) = q_len.shape[0], q.shape[2:]
    group = num_heads // k.shape[2]
    block_d = dot_extent(head_dim)
    tma = tma_path(q, k, v, out, max_seqlen_q, block_table)
    if tma:
        block_m, block_n, num_warps, num_stages, warp_specialize = (
            INTERPRET_TMA_CONFIG if INTERPRET else TMA_CONFIGS[head_dim])
    else:
        block_m, block_n, num_warps, num_stages = tile_config(CONFIGS, INTERPRET_CONFIG, head_dim, q.dtype,
                                                              q.device)
        warp_specialize = False
    # Causal is a right window of 0 (causal with window_right > 0 still stops at the diagonal).
    right = 0 if causal else window_right
    paged = block_table is not None
    num_m_tiles = triton.cdiv(max_seqlen_q, block_m)
    grid = (batch * num_heads * num_m_tiles,)
    has_softcap = softcap > 0
    run = functools.partial(
        launch, _prefill_kernel, grid,
        q, k, v, out, lse, block_table if paged else q_len, q_start, q_len, k_start, k_len,
        batch_stride(q), q.stride(1), q.stride(2), k.stride(0) if paged else batch_stride(k), k.stride(1),
        k.stride(2), v.stride(0) if paged else batch_stride(v), v.stride(1), v.stride(2),
        batch_stride(out), out.stride(1), out.stride(2), batch_stride(lse), lse.stride(1), lse.stride(2),
        block_table.stride(0) if paged else 0,
        num_heads, group, num_m_tiles, max(window_left, 0), max(right, 0),
        softmax_scale * LOG2E, softmax_scale / softcap if has_softcap else 1.0,
        softcap * LOG2E if has_softcap else 1.0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        # a constant page size: a key's page and row are shifts and masks (pages of 2^k) or a multiply, not a
        # division per key and tile; one compile per page size in use
        PAGE_SIZE=k.shape[1] if paged else 1, WIDE=paged and wide_offsets(k, v),
        HAS_LEFT=window_left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=has_softcap, PAGED=paged,
        TILE_IN_PAGE=paged and k.shape[1] % block_n == 0,
        UPCAST_DOT=INTERPRET and q.dtype == torch.bfloat16,
        # fp32: 3-pass TF32 (~fp32-exact, on tensor cores); "ieee" falls back to FMA and spills everything.
        DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32", TMA=tma, WARP_SPECIALIZE=warp_specialize,
        num_warps=num_warps, num_stages=num_stages,
    )
    if tma and q.is_cuda:
        # tl.make_tensor_descriptor takes global scratch from Triton's allocator at launch; set in a copy of the
        # context, so that a caller's own allocator stays in place.
        context = contextvars.copy_context()
        context.run(triton.set_allocator, _descriptor_scratch(q.device))
        run = functools.partial(context.run, run)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        run()

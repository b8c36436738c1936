"""Single-query attention over a paged KV cache with split-KV (flash-decoding).

One program per (sequence, KV head, split): the whole group of query heads sharing the KV head is packed into the
M dimension of ``tl.dot`` (padded to 16 rows), so every key and value is read from memory once. Keys are gathered
BLOCK_N at a time through the block table, so the tile size does not depend on the page size. Split ``s`` streams
tiles s, s + num_splits, ... of the sequence's keys through the online softmax of ``softmax_state`` (shared with
prefill) and writes an fp32 partial (out, lse); a second small kernel merges the partials with the helpers of
``merge``. With one split the first kernel writes the result directly."""
import contextlib

import torch
import triton
import triton.language as tl

from . import INTERPRET, dependent_launch, device_properties, dot_extent, head_dim_bucket, launch, tile_config
from .merge import merge_many, merge_outputs, merge_weights
from .paged_kv import kv_tile, page_ids
from .softmax_state import LOG2E, online_softmax_fold, pv_accumulate, qk_scores, softmax_output

# (BLOCK_N, num_warps, num_stages, programs per SM) keyed by (head-dim bucket, fp32 inputs, GPU major version); the
# bucket is the padded tile width. Missing arch -> the sm80 row. 16-bit: K and V tiles of 16 KiB each (64 x 128 bf16);
# num_stages 3 gives the copies two buffers, enough loads in flight for HBM. fp32 dots run on FMA units: 8 warps and
# short tiles keep them from spilling. Programs per SM: how many of the config's programs one SM holds at once, as
# Triton 3.6 compiles them for sm90 (registers, shared memory and warps against the SM's: ``resident_programs``;
# tests/test_kernel_decode.py checks it against the GPU at hand); the sm80 rows carry their sm90 figure, unmeasured on
# an sm80 GPU. All read from the H200's compiled kernels, 2026-12-03 (the fewest over the unsplit and split variants;
# head dim 64 bf16 and 128 fp32 read again with the page size a compile-time constant and the page ids int64
# loop-carried values: 8 -> 9 and 3 -> 4).
# The split count fills them (``program_slots``). Tune on the GPU with scripts/tune_decode.py.
CONFIGS = {
    (64, False, 8): (128, 4, 3, 3),
    (128, False, 8): (64, 4, 3, 3),
    (256, False, 8): (32, 4, 3, 3),
    (64, True, 8): (32, 8, 3, 4),
    (128, True, 8): (16, 8, 3, 4),
    (256, True, 8): (16, 8, 3, 2),
    # H200, 2026-12-03 (head dim 64, bf16, GQA 32/8, pages of 16, planned splits, against (64, 8, 3; 4 per SM)):
    # 1 x 576 0.110 TB/s vs 0.096; 8 x 8256 2.45 vs 2.40; 16 x 2112 1.87 vs 1.84; 128 x 576 2.72 vs 2.50 (1,024
    # programs in one wave); 64 x 1088 2.51 vs 2.61 (two splits planned; the one loss).
    (64, False, 9): (32, 4, 3, 9),
    (128, False, 9): (32, 4, 3, 4),  # H100, scripts/tune_decode.py 2026-11-23: best geomean, 95-99 % of copy at B>=64
}
# The interpreter runs numpy per program: 16-key tiles give the tests' short sequences several tiles per split.
INTERPRET_CONFIG = (16, 4, 1, 1)

# choose_num_splits: each split streams at least MIN_SPLIT_KEYS[head-dim bucket] keys (fewer would not amortise the
# split's query load, partial write and merge) and at most MAX_SPLITS; together the programs fill the GPU's program
# slots (``program_slots``) once. The floors are measured (H200, bf16, GQA 32/8, 2026-12-03): head dim 128 at 1 x 4k,
# 32 splits of 128 keys 0.97 TB/s, 64 of 64 keys 0.90; head dim 64 at 1 x 576 (generate()'s batch-1 step), 4 splits
# of 144 keys 0.091 TB/s, 16 of 36 keys 0.110 (12.3 -> 10.7 us a layer).
MIN_SPLIT_KEYS = {64: 32, 128: 128, 256: 128}
MAX_SPLITS = 64
REDUCE_TILE = 4096  # elements of the reduce kernel's [splits, D] tile: 32 fp32 registers per thread at 4 warps


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, K, V, bt_row, stride_btp, max_pages, kv_lo, first, last, step, seqlen,
                  stride_kp, stride_kn, stride_vp, stride_vn, qk_scale, cap_scale, cap_log2, offs_n, offs_d,
                  PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Folds key tiles first, first + step, ... < last (tile t holds keys kv_lo + t * BLOCK_N + [0, BLOCK_N)) into
    the running (acc, l_i, m_i), in the log2 domain. MASKED: the tiles are ragged and keys past seqlen are hidden;
    otherwise every key of every tile is visible and nothing is masked."""
    # Keys are gathered BLOCK_N at a time through the block table, whatever the page size. The page ids of the next
    # tile are loaded one iteration ahead by hand: K/V addresses then come from a loop-carried value, not from a load
    # of the same iteration, and Triton's pipeliner gives the K/V copies num_stages - 1 buffers instead of one.
    # The page-id loads are bounded by the table's width, not by seqlen: without a window the first one does not
    # wait for the length load (one memory round trip less before the first K/V tile).
    # Offsets are 64-bit whatever the pool's size (unlike prefill's): with 32-bit ones (H200, 2026-12-03) the head dim
    # 128 bf16 kernel took fewer registers, an SM held 5 of its programs instead of 4, and with pages of 16 it lost
    # where it ran more programs than slots: 128 x 2k 3.59 TB/s instead of 4.08, 256 x 1k 3.79 instead of 3.98.
    cols_next = kv_lo + first * BLOCK_N + offs_n
    page_next = page_ids(bt_row, cols_next, cols_next // PAGE_SIZE < max_pages, stride_btp, PAGE_SIZE, WIDE=True)
    for tile in range(first, last, step):
        cols = kv_lo + tile * BLOCK_N + offs_n
        page = page_next
        cols_next = cols + step * BLOCK_N
        page_next = page_ids(bt_row, cols_next, cols_next // PAGE_SIZE < max_pages, stride_btp, PAGE_SIZE, WIDE=True)
        row = (cols % PAGE_SIZE).to(tl.int64)
        k_ptrs = K + (page * stride_kp + row * stride_kn)[:, None] + offs_d[None, :]
        v_ptrs = V + (page * stride_vp + row * stride_vn)[:, None] + offs_d[None, :]
        k = kv_tile(k_ptrs, cols, seqlen, offs_d, MASKED, PAD_D, HEAD_DIM)
        v = kv_tile(v_ptrs, cols, seqlen, offs_d, MASKED, PAD_D, HEAD_DIM)
        qk = qk_scores(q, k, qk_scale, cap_scale, cap_log2, HAS_SOFTCAP, DEFER_SCALE=False, UPCAST_DOT=UPCAST_DOT,
                       DOT_PREC=DOT_PREC)
        if MASKED:
            qk = tl.where(cols[None, :] < seqlen, qk, float("-inf"))
        # Every tile holds at least one visible key, so the new maxima are finite: no -inf guard needed.
        acc, l_i, m_i, p = online_softmax_fold(acc, l_i, m_i, qk, qk_scale, DEFER_SCALE=False, GUARD_EMPTY=False)
        acc = pv_accumulate(acc, p, v, UPCAST_DOT, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _decode_kernel(Q, K, V, BlockTable, Seqlens, Out, Lse, OutPart, LsePart,
                   stride_qb, stride_qh, stride_kp, stride_kn, stride_kh, stride_vp, stride_vn, stride_vh,
                   stride_btb, stride_btp, max_pages, stride_ob, stride_oh, stride_lb, stride_lh,
                   num_heads, num_kv_heads, group, window_left, num_splits,
                   qk_scale, cap_scale, cap_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE_SIZE: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr,
                   UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr):
    # Layouts (element strides, last dim contiguous):
    #   Q / Out      [B, Hq, D]; Lse [B, Hq] float32, natural log
    #   K / V        pools [num_pages, PAGE_SIZE, Hkv, D]; key j of sequence b at page BlockTable[b, j // PAGE_SIZE],
    #                row j % PAGE_SIZE; keys 0 .. Seqlens[b] - 1 exist and the query is the last of them
    #   OutPart      [B, Hq, num_splits, HEAD_DIM] float32 and LsePart [B, Hq, num_splits] (SPLIT only), contiguous
    # Grid (B * Hkv, num_splits); query heads kv_head * group .. + group - 1 are the rows of the tile.
    if PDL:  # launched early (``dependent_launch``): q and the page just written must be stored first
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel waits in its gdc_wait for this grid's stores
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // num_kv_heads
    kv_head = pid % num_kv_heads
    b64 = b.to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    heads = (kv_head * group + offs_g).to(tl.int64)
    g_ok = offs_g < group
    gd_ok = g_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    # Loads that need no length go first, so their memory round trips overlap the length's.
    q = tl.load(Q + b64 * stride_qb + (heads * stride_qh)[:, None] + offs_d[None, :], mask=gd_ok, other=0.0)
    seqlen = tl.load(Seqlens + b)

    # Visible keys [kv_lo, seqlen) in tiles of BLOCK_N from kv_lo (the gather needs no alignment), dealt to the
    # splits round robin: split s takes tiles s, s + num_splits, ..., so where a split starts does not depend on
    # seqlen. Only the last tile can be ragged. Splits past the last tile get no tile and write an empty state, so
    # the grid is fixed whatever the lengths.
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(seqlen - 1 - window_left, 0)
    full_tiles = (seqlen - kv_lo) // BLOCK_N
    all_tiles = tl.cdiv(seqlen - kv_lo, BLOCK_N)
    ragged = full_tiles + (split + num_splits - full_tiles % num_splits) % num_splits  # this split's, if any

    K += kv_head.to(tl.int64) * stride_kh
    V += kv_head.to(tl.int64) * stride_vh
    bt_row = BlockTable + b64 * stride_btb
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, K, V, bt_row, stride_btp, max_pages, kv_lo, split, full_tiles,
                                  num_splits, seqlen, stride_kp, stride_kn, stride_vp, stride_vn,
                                  qk_scale, cap_scale, cap_log2, offs_n, offs_d,
                                  PAGE_SIZE, BLOCK_N, False, HAS_SOFTCAP, PAD_D, HEAD_DIM, UPCAST_DOT, DOT_PREC)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, K, V, bt_row, stride_btp, max_pages, kv_lo, ragged, all_tiles,
                                  num_splits, seqlen, stride_kp, stride_kn, stride_vp, stride_vn,
                                  qk_scale, cap_scale, cap_log2, offs_n, offs_d,
                                  PAGE_SIZE, BLOCK_N, True, HAS_SOFTCAP, PAD_D, HEAD_DIM, UPCAST_DOT, DOT_PREC)

    out, lse = softmax_output(acc, l_i, m_i)  # an empty range leaves l = 0: out 0, lse -inf
    if SPLIT:
        part = (b64 * num_heads + heads) * num_splits + split
        tl.store(OutPart + (part * HEAD_DIM)[:, None] + offs_d[None, :], out, mask=gd_ok)
        tl.store(LsePart + part, lse, mask=g_ok)
    else:
        tl.store(Out + b64 * stride_ob + (heads * stride_oh)[:, None] + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=gd_ok)
        tl.store(Lse + b64 * stride_lb + heads * stride_lh, lse, mask=g_ok)


@triton.jit
def _reduce_kernel(OutPart, LsePart, Out, Lse, num_heads, num_splits, stride_ob, stride_oh, stride_lb, stride_lh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    # One program per (sequence, query head): merges its num_splits partials BLOCK_S at a time, each chunk loaded as
    # one tile (all loads in flight together) and merged in one step.
    if PDL:  # launched early (``dependent_launch``): the partials must be complete
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    base = pid.to(tl.int64) * num_splits
    out = tl.zeros([BLOCK_D], dtype=tl.float32)
    lse = tl.full([], float("-inf"), dtype=tl.float32)  # an empty state
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        lse_s = tl.load(LsePart + base + s0 + offs_s, mask=s_ok, other=float("-inf"))
        o_s = tl.load(OutPart + ((base + s0 + offs_s) * HEAD_DIM)[:, None] + offs_d[None, :],
                      mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        o_c, lse_c = merge_many(o_s, lse_s)
        w_a, w_b, lse = merge_weights(lse, lse_c)
        out = merge_outputs(out, w_a, o_c, w_b)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + b.to(tl.int64) * stride_lb + h * stride_lh, lse)


def _tile(head_dim, dtype, device):
    """``(BLOCK_D, BLOCK_N, num_warps, num_stages, programs per SM)`` of the decode kernel for this head dim and
    dtype."""
    block_d = dot_extent(head_dim)
    return (block_d, *tile_config(CONFIGS, INTERPRET_CONFIG, head_dim, dtype, device))


def program_slots(head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many decode programs ``device`` runs at once for this head dim and dtype: its SMs times the programs of
    the tile config that one SM holds. Interpreter: 1."""
    if device.type != "cuda" or INTERPRET:
        return 1
    per_sm = _tile(head_dim, dtype, device)[-1]
    return device_properties(device).multi_processor_count * per_sm


def resident_programs(device: torch.device) -> int:
    """Programs per SM of the decode kernels compiled so far on ``device`` (the fewest over them): registers
    (allocated per warp, 256 at a time), shared memory (plus the 1 KiB each program reserves) and warps against the
    SM's. What CONFIGS' last column must say; the tests and scripts/tune_decode.py clear the compiled kernels
    (``clear_compiled``), run one config and ask."""
    props = device_properties(device)
    counts = []
    for caches in _decode_kernel.device_caches.values():
        for kernel in caches[0].values():
            warps = kernel.metadata.num_warps
            kernel._init_handles()  # loads the binary: n_regs is known from then on
            regs_per_warp = -(-kernel.n_regs * 32 // 256) * 256
            counts.append(min(props.regs_per_multiprocessor // (regs_per_warp * warps),
                              props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024),
                              props.max_threads_per_multi_processor // (32 * warps)))
    return min(counts)


def choose_num_splits(batch: int, num_kv_heads: int, max_seqlen: int, slots: int, head_dim: int) -> int:
    """Split-KV factor for ``paged_decode``: as many splits as fill the GPU's ``slots`` (``program_slots``) once,
    none shorter than the head dim's MIN_SPLIT_KEYS, at most MAX_SPLITS; 1 when the batch's (sequence, KV head)
    pairs fill them already. Filling the slots, no more, was the best split at every shape of an H200 sweep with 2
    and 4 programs per SM (GQA 32/8, D 64 and 128, B x L from 1 x 4k to 256 x 1k): fewer programs leave loads out of
    flight, more add a merge and a tail. With 8 per SM (D64) one case loses: 64 x 1088 plans 2 splits, 4 % slower
    than 1."""
    most = min(MAX_SPLITS, max_seqlen // MIN_SPLIT_KEYS[head_dim_bucket(head_dim)])
    return max(1, min(most, slots // max(batch * num_kv_heads, 1)))


def paged_decode(q, k_pool, v_pool, block_table, seqlens, out, lse, *, softmax_scale: float,
                 window_left: int, softcap: float, num_splits: int) -> None:
    """One query per sequence (the last of its ``seqlens[b]`` keys) over paged K/V, written into ``out`` ``[B, Hq,
    D]`` and ``lse`` ``[B, Hq]``; ``num_splits`` splits of each sequence's keys run in parallel and are merged."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    group = num_heads // num_kv_heads
    block_g = dot_extent(group)
    block_d, block_n, num_warps, num_stages, _ = _tile(head_dim, q.dtype, q.device)
    split = num_splits > 1
    if split:
        out_part = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        out_part, lse_part = out, lse  # unused
    has_softcap = softcap > 0
    pdl = dependent_launch(q.device)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        launch(
            _decode_kernel, (batch * num_kv_heads, num_splits),
            q, k_pool, v_pool, block_table, seqlens, out, lse, out_part, lse_part,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
            v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), block_table.stride(0), block_table.stride(1),
            block_table.shape[1], out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            num_heads, num_kv_heads, group, max(window_left, 0), num_splits,
            softmax_scale * LOG2E, softmax_scale / softcap if has_softcap else 1.0,
            softcap * LOG2E if has_softcap else 1.0,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_N=block_n, PAGE_SIZE=k_pool.shape[1],
            HAS_WINDOW=window_left >= 0, HAS_SOFTCAP=has_softcap, SPLIT=split,
            UPCAST_DOT=INTERPRET and q.dtype == torch.bfloat16,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", PDL=pdl,
            num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
        )
        if split:
            block_d_reduce = triton.next_power_of_2(head_dim)
            block_s = min(triton.next_power_of_2(num_splits), max(1, REDUCE_TILE // block_d_reduce))
            launch(
                _reduce_kernel, (batch * num_heads,), out_part, lse_part, out, lse, num_heads, num_splits,
                out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
                HEAD_DIM=head_dim, BLOCK_D=block_d_reduce, BLOCK_S=block_s, PDL=pdl, num_warps=4, launch_pdl=pdl,
            )

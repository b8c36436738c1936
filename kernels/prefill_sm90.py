"""Hopper (sm90) prefill in Gluon: FlashAttention-3's pipelining for the 16-bit case, in two kernels.

Triton's ``tl.dot`` waits for a warpgroup MMA as soon as its result is next used, so the pointer kernel
(``prefill``) runs each tile's softmax after its score MMA and before its value MMA, with the tensor cores idle
meanwhile. Gluon exposes the asynchronous MMA and its wait: in both kernels each turn of the key loop issues the
scores of the next key tile and the value product of this one, waits for the scores only (the older of the two MMA
groups), folds them into the online softmax, and only then waits for the value MMA and rescales the accumulator.
(ptxas of Triton 3.6 still moves that last wait ahead of the exponentials, whatever the order written: in the SASS
the value MMA overlaps the row maximum only. A never-taken branch right after the exponentials keeps the wait below
them, but was slower on an H100: 0.85-1.12 of this kernel, 0.95-0.98 at most shapes, BENCHMARKS.md 2026-12-05.)

``_prefill_sm90_kernel``: one warpgroup per program, two or three programs per SM; what overlaps a program's softmax
is another program's MMAs. K and V tiles arrive by TMA into a ring of ``STAGES`` shared-memory slots, each with an
mbarrier; a slot is refilled once every warp is past the MMAs that read it (a CTA barrier).

``_prefill_sm90_ws_kernel`` (FlashAttention-3's ping-pong, persistent): one program per SM, warp-specialized, takes
work items of 128 query rows of one (sequence, head) in pairs, a long causal tile with a short one. A producer warp
issues every TMA copy (each item's Q once the consumers are done with the last one's, then K and V per key tile into
the ring, waiting on a slot's "empty" mbarrier that both consumers arrive on); two consumer warpgroups of 64 rows each
run the loop above and take turns issuing their MMAs (a pair of "turn" mbarriers), so one's softmax runs while the
other's MMAs keep the tensor cores busy. The ring's and the turns' mbarrier phases run on across items: the next
item's loads overlap this one's last MMAs and epilogue. The consumers get most of the registers (setmaxnreg).

Q, K and V are 4-D tensor descriptors over ``[B, S, H, D]`` built on the host (no per-program descriptor writes);
rows past a sequence belong to the next one or lie past the tensor (zero-filled), and are masked or not stored. Paged
K/V (pools ``[pages, page_size, H, D]``) load the same way, one box per page a key tile spans, its page read from the
block table ahead of the copy. The key loop has no branch inside (ptxas waits for every MMA in flight where control
flow merges): fully visible tiles and masked tiles run in two loops of one step.

The online-softmax steps mirror ``softmax_state``'s (log2 domain, scale in the exponent's fma, the -inf guard) in
Gluon, which cannot call Triton's jit helpers. Scope: 16-bit inputs, head dim 64, 128 or 256, dense K/V or pages that
hold whole key tiles or split them evenly into boxes of ``MIN_BOX_ROWS`` rows or more (16 in the warp-specialized
kernel, 32 in the other), causal (bottom-right) or full, no window, no soft-cap, a positive scale. ``sm90_path`` says
which calls take it; the others keep ``prefill``."""
import contextlib
import functools
import logging
from typing import NamedTuple

import torch
import triton
from triton.compiler.errors import CompilationError

from . import INTERPRET, batch_stride, device_properties, launch, tma_aligned
from .softmax_state import LOG2E

try:  # Gluon is Triton's experimental layer: its names may move between releases
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # Triton 3.7 renamed the TMA load (3.6 has only the old name; 3.9's old name raises)
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # likewise renamed (3.9 has no thread_barrier)
    smem_reinterpret = (getattr(gl.shared_memory_descriptor, "reinterpret", None)  # 3.9; 3.6 has only the old name
                        or gl.shared_memory_descriptor._reinterpret)
    GLUON_ERROR = None
except (ImportError, AttributeError) as error:  # pragma: no cover - depends on the installed Triton
    GLUON_ERROR = error



class Sm90Config(NamedTuple):
    """A tile config of the Gluon prefill. STAGES >= 2: the next key tile and this value tile are in different slots.
    Q in registers: the score MMA reads only K from shared memory. Warp-specialized: ``_prefill_sm90_ws_kernel``, two
    consumer warpgroups of ``num_warps`` warps (BLOCK_M = 2 x 16 x num_warps rows) and a producer warp, one program
    per SM; otherwise ``_prefill_sm90_kernel``, one warpgroup per program and two or three programs per SM."""
    block_m: int
    block_n: int
    stages: int
    num_warps: int
    q_in_registers: bool
    warp_specialized: bool = False


# Configs by (head dim, max_seqlen_q >= SM90_LONG_SEQLEN). One warpgroup per program: two or three programs' softmax and
# MMA phases drift apart, so one's tensor-core work fills another's softmax (two warpgroups sharing K/V tiles without
# specialization lost at every length). H200, bf16, 16k tokens a call, TFLOP/s at S = 1k / 4k / 16k, causal and full
# (2026-12-04 19:04 UTC, BENCHMARKS.md): D64 (64, 64, 4, 4) 295 / 382 / 432, 382 / 417 / 435, (64, 128, 3, 4) with Q
# in registers 258 / 388 / 462, 334 / 432 / 451. D128 is warp-specialized (FlashAttention-3's ping-pong), against
# (64, 64, 3, 4) on an H100 (2026-12-05 19:19 UTC, BENCHMARKS.md), causal 1k / 4k / 16k: 359 / 518 / 612 against
# 331 / 471 / 531, full 520 / 594 / 638 against 379 / 515 / 549 (cuDNN: 430 / 540 / 573, 600 / 635 / 607); made
# persistent (2026-12-06 02:19 UTC, H100): causal 369 / 536 / 605 against 339 / 502 / 618 (cuDNN 423 / 524 / 610),
# GQA 32/8 causal 401 / 586 / 639 against 362 / 525 / 613, full within 0.99-1.07. D256: the persistent kernel at
# 128 x 64 tiles (229,488 bytes of shared memory), best of five candidates on an H100 (2026-12-07 01:25 UTC,
# BENCHMARKS.md) but at 1k causal (364 against 371): causal 1k / 4k / 16k 364 / 641 / 742, full 538 / 721 / 732
# (Triton kernel: 254 / 331 / 359, 330 / 353 / 387; cuDNN: 444 / 599 / 659, 613 / 729 / 689).
SM90_CONFIGS = {
    (64, False): Sm90Config(64, 64, 4, 4, False),
    (64, True): Sm90Config(64, 128, 3, 4, True),
    (128, False): Sm90Config(128, 128, 2, 4, False, warp_specialized=True),
    (128, True): Sm90Config(128, 128, 2, 4, False, warp_specialized=True),
    (256, False): Sm90Config(128, 64, 2, 4, False, warp_specialized=True),
    (256, True): Sm90Config(128, 64, 2, 4, False, warp_specialized=True),
}
SM90_HEAD_DIMS = (64, 128, 256)
SM90_LONG_SEQLEN = 4096
SM90_DTYPES = (torch.float16, torch.bfloat16)
COMPILE_ERROR = None  # set by the first launch that failed to compile: then no call takes this kernel
# Boxes of part of a key tile (pages smaller than a tile) are 128 bytes wide, the swizzle's width: the widest box TMA
# writes as one column block of the tile.
KV_BOX_COLS = 64
# Paged K/V: the fewest rows a box may carry, by kernel (``Sm90Config.warp_specialized``). In the one-warpgroup kernel,
# boxes of 16 rows (pages of 16) give correct results but lose to the Triton kernel's gathered loads: each box's copy is
# separated from the next by a barrier over the whole warpgroup, which Triton's shared-memory analysis puts between
# writes to views of one buffer. H100, bf16, append of N over L cached keys (2026-12-05, BENCHMARKS.md), TFLOP/s Gluon /
# Triton: D128 GQA 32/8, pages of 16: 344-389 / 420-466; of 32: 427-501 / 370-462; of 64: 456-577 / 434-502; D64 GQA
# 16/4, pages of 16: 254-326 / 293-357; of 32: 305-385 / 304-355. Gathering small pages row by row with cp.async instead
# was slower still at D128 (0.67-0.69 of dense, against the Triton kernel's 0.79-0.89). In the warp-specialized kernel
# the producer warp alone issues the copies, and the barrier between them is a warp's (bar.warp.sync): pages of 16 ran
# at 0.88-0.99 of dense there (H100, D128 GQA append, bf16 and fp16, 2026-12-06), against 0.74-0.77 on the Triton kernel
# in an earlier call.
MIN_BOX_ROWS = {False: 32, True: 16}

if GLUON_ERROR is None:
    # Registers per thread of the warp-specialized kernel's partitions (setmaxnreg): the 12 warps of one program per
    # SM share 64K; Triton gives the default partition (consumer warpgroup 0) what the others leave, 240 here too.
    # ptxas (Triton 3.6) spills 56-144 bytes of a consumer's per-item values around each item, none in the key loop.
    WS_CONSUMER_REGISTERS = gl.constexpr(240)
    WS_PRODUCER_REGISTERS = gl.constexpr(24)

    @gluon.jit
    def _mask_scores(qk, tile, rows, offs_n, k_len, diag, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """Scores of key tile ``tile`` with the keys a row does not see at -inf: past k_len, and (causal) right of
        the row's diagonal."""
        cols = tile * BLOCK_N + offs_n
        keep = cols[None, :] < k_len
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + diag)
        return gl.where(keep, qk, float("-inf"))

    @gluon.jit
    def _fold(qk, m_i, l_i, qk_scale):
        """The online-softmax fold of one tile's raw scores (log2 domain, scale applied in the exponent's fma):
        returns (m, l, p, alpha); a row that has seen no key keeps m = -inf and gets p = alpha = 0."""
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk * qk_scale - m_sub[:, None])
        alpha = gl.exp2(m_i - m_sub)
        l_i = l_i * alpha + gl.sum(p, 1)
        return m_new, l_i, p, alpha

    @gluon.jit
    def _program_rows(q_len_ptr, num_heads, num_m_tiles, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
        """(b, h, start_m, q_len): the sequence, head and first query row of this program (causal: the longest tiles
        first, for a shorter tail)."""
        pid = gl.program_id(0)
        bh = pid // num_m_tiles
        m_tile = pid % num_m_tiles
        if CAUSAL:
            m_tile = num_m_tiles - 1 - m_tile
        b = bh // num_heads
        return b, bh % num_heads, m_tile * BLOCK_M, gl.load(q_len_ptr + b)

    @gluon.jit
    def _key_tiles(start_m, BLOCK_M: gl.constexpr, q_len, k_len, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """(n_tiles, n_full) of query rows ``start_m .. start_m + BLOCK_M - 1``: key tiles [0, n_tiles) hold the keys
        some row sees, and tiles [0, n_full) are seen whole by every row (no mask)."""
        hi = k_len
        mid_hi = k_len
        if CAUSAL:
            diag = k_len - q_len
            hi = gl.minimum(k_len, gl.minimum(start_m + BLOCK_M, q_len) + diag)
            mid_hi = gl.minimum(k_len, start_m + diag + 1)
        return gl.cdiv(gl.maximum(hi, 0), BLOCK_N), gl.maximum(mid_hi, 0) // BLOCK_N

    @gluon.jit
    def _tile_pages(tile, bt_row, k_len, issue, BLOCK_N: gl.constexpr, BOX: gl.constexpr, PAGE_SIZE: gl.constexpr,
                    PAGED: gl.constexpr, pages_layout: gl.constexpr):
        """(PAGED) The page of each of key tile ``tile``'s boxes, from the block table; keys past k_len read page 0
        (their scores are masked and the last tile's values zeroed). Loaded a step before the copies that need it:
        issued beside them, the load's latency stalled the warpgroup once a tile."""
        keys = tile * BLOCK_N + gl.arange(0, BLOCK_N // BOX, layout=pages_layout) * BOX
        if PAGED:
            pages = gl.load(bt_row + keys // PAGE_SIZE, mask=issue & (keys < k_len), other=0)
        else:
            pages = gl.zeros_like(keys)
        return pages

    @gluon.jit
    def _load_tile(tile, slot, issue, pages, desc, smem, bar, kb, k_row0, kv_head, BLOCK_N: gl.constexpr,
                   BOX: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr):
        """Issues the TMA copies of key tile ``tile`` of K or V (``desc``) into ring slot ``slot`` of ``smem``, each
        signalling the slot's mbarrier in ``bar``: boxes of the sequence's rows, or (PAGED) of each page the tile
        spans (``pages``, from ``_tile_pages``). A box is BOX rows by COLS columns, 128 bytes: a tile's shared memory
        holds its 128-byte column blocks one after the other (the swizzle's width), each BLOCK_N rows, so each box
        lands at its rows within its column block."""
        HEAD_DIM: gl.constexpr = smem.shape[2]
        box: gl.constexpr = desc.block_type.shape
        COLS: gl.constexpr = box[3]
        NUM_BOXES: gl.constexpr = BLOCK_N // BOX
        NUM_COL_BLOCKS: gl.constexpr = HEAD_DIM // COLS
        # The slot as its boxes in that order, reinterpreted whole and then indexed: Triton 3.8 reinterprets no
        # subview (a slice of the slot).
        boxes = smem_reinterpret(smem.index(slot), desc.dtype,
                                 [NUM_COL_BLOCKS * NUM_BOXES, box[0], box[1], box[2], box[3]], desc.layout)
        mbarrier.expect(bar.index(slot), desc.block_type.nbytes * NUM_BOXES * NUM_COL_BLOCKS, pred=issue)
        for i in gl.static_range(NUM_BOXES):
            key = tile * BLOCK_N + i * BOX
            if PAGED:  # the box's entry of ``pages`` (each thread holds them all: no exchange)
                page = gl.sum(gl.where(gl.arange(0, NUM_BOXES, layout=pages.type.layout) == i, pages, 0), axis=0)
                row = key % PAGE_SIZE
            else:
                page = kb
                row = k_row0 + key
            for c in gl.static_range(NUM_COL_BLOCKS):
                tma_load(desc, [page, row, kv_head, c * COLS], bar.index(slot), boxes.index(c * NUM_BOXES + i),
                         pred=issue)

    @gluon.jit
    def _zero_tail_values(v_last, last, k_len, BLOCK_N: gl.constexpr):
        """Zeroes the rows of the last value tile past the sequence's keys (the next sequence's, padding, page 0):
        their weights are 0, but 0 times a NaN or inf there would still reach the sum."""
        v_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
        v_rows = last * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, v_layout))
        v_tile = v_last.load(v_layout)
        v_last.store(gl.where((v_rows < k_len)[:, None], v_tile, gl.zeros_like(v_tile)))
        fence_async_shared()
        cta_barrier()

    @gluon.jit
    def _store_rows(acc, m_i, l_i, Out, Lse, b, h, q_row0, start_m, q_len, stride_ob, stride_os, stride_oh,
                    stride_lb, stride_lh, stride_ls, o_layout: gl.constexpr):
        """out = acc / l and the natural-log lse of query rows ``start_m ..`` of sequence ``b`` (those below q_len);
        rows that saw no key: out 0, lse -inf."""
        BLOCK_M: gl.constexpr = acc.shape[0]
        HEAD_DIM: gl.constexpr = acc.shape[1]
        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        inv = gl.convert_layout(gl.where(empty, 0.0, 1.0 / l_safe), gl.SliceLayout(1, o_layout))
        # Through a layout of 16-byte rows per thread: the accumulator's layout stores 4 bytes at a time.
        store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8],
                                                      [gl.num_warps(), 1], [1, 0])
        out = gl.convert_layout((acc * inv[:, None]).to(Out.dtype.element_ty), store_layout)
        offs_mo = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, store_layout))
        o_base = (b.to(gl.int64) * stride_ob + (q_row0 + start_m).to(gl.int64) * stride_os
                  + h.to(gl.int64) * stride_oh)
        o_ptrs = Out + o_base + (offs_mo.to(gl.int64) * stride_os)[:, None] + offs_d[None, :]
        gl.store(o_ptrs, out, mask=((start_m + offs_mo) < q_len)[:, None])
        offs_m = gl.arange(0, BLOCK_M, layout=m_i.type.layout)
        l_base = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + (q_row0 + start_m).to(gl.int64) * stride_ls
        gl.store(Lse + l_base + offs_m * stride_ls, lse, mask=(start_m + offs_m) < q_len)

    @gluon.jit
    def _step(j, acc, m_i, l_i, p, q_tile, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, kb, k_row0, kv_head,
              bt_row, n_tiles, rows, offs_n, k_len, diag, qk_scale, s_zero, MASKED: gl.constexpr,
              CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              BOX: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr, pages_layout: gl.constexpr,
              p_layout: gl.constexpr, o_layout: gl.constexpr):
        """One turn of the key loop: the value MMA of tile j (weights ``p``) beside the scores and softmax of tile
        j + 1; returns the state with tile j folded in and tile j + 1's weights. Branch-free: ptxas waits for every
        MMA in flight where control flow merges, so the masked and unmasked tiles run in separate loops."""
        slot = j % STAGES
        nxt = (j + 1) % STAGES
        refill = j + STAGES < n_tiles
        pages = _tile_pages(j + STAGES, bt_row, k_len, refill, BLOCK_N, BOX, PAGE_SIZE, PAGED, pages_layout)
        # The next tile's scores first, then this tile's values: MMA groups complete in issue order, so waiting for
        # all but one returns the scores while the value MMA still runs.
        mbarrier.wait(k_bar.index(nxt), ((j + 1) // STAGES) & 1)
        qk = warpgroup_mma(q_tile, k_smem.index(nxt).permute((1, 0)), s_zero,
                           use_acc=False, is_async=True)
        mbarrier.wait(v_bar.index(slot), (j // STAGES) & 1)
        p_op = gl.convert_layout(p.to(k_desc.dtype), p_layout)
        acc = warpgroup_mma(p_op, v_smem.index(slot), acc, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))
        if MASKED:
            qk = _mask_scores(qk, j + 1, rows, offs_n, k_len, diag, BLOCK_N, CAUSAL)
        m_i, l_i, p, alpha = _fold(qk, m_i, l_i, qk_scale)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        # Every warpgroup is past the MMAs that read this slot: refill it with tile j + STAGES.
        cta_barrier()
        _load_tile(j + STAGES, slot, refill, pages, k_desc, k_smem, k_bar, kb, k_row0, kv_head, BLOCK_N, BOX,
                   PAGE_SIZE, PAGED)
        _load_tile(j + STAGES, slot, refill, pages, v_desc, v_smem, v_bar, kb, k_row0, kv_head, BLOCK_N, BOX,
                   PAGE_SIZE, PAGED)
        return acc, m_i, l_i, p

    @gluon.jit
    def _prefill_sm90_kernel(q_desc, k_desc, v_desc, Out, Lse, BlockTable, q_start_ptr, q_len_ptr, k_start_ptr,
                             k_len_ptr, stride_btb, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                             num_heads, group, num_m_tiles, q_batched, k_batched, qk_scale,
                             CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_IN_REGISTERS: gl.constexpr,
                             PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        b, h, start_m, q_len = _program_rows(q_len_ptr, num_heads, num_m_tiles, BLOCK_M, CAUSAL)
        if start_m >= q_len:
            return
        q_row0 = gl.load(q_start_ptr + b)
        k_row0 = gl.load(k_start_ptr + b)
        k_len = gl.load(k_len_ptr + b)
        kv_head = h // group

        # Warpgroup MMA layouts: warps stacked along M (16 rows each), one instruction spans the tile's N.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

        diag = k_len - q_len  # query i sees key j iff j <= i + diag (causal)
        n_tiles, n_full = _key_tiles(start_m, BLOCK_M, q_len, k_len, BLOCK_N, CAUSAL)

        q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
        # A slot holds one [BLOCK_N, HEAD_DIM] tile, which TMA fills as BLOCK_N // BOX boxes of the descriptors' BOX
        # rows, one after the other (a swizzle pattern spans 8 rows: boxes of 16 rows or more stack into the tile's).
        BOX: gl.constexpr = k_desc.block_type.shape[1]
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(s), count=1)
            mbarrier.init(v_bar.index(s), count=1)

        qb = b * q_batched  # a packed batch of one: every sequence is in batch entry 0
        kb = b * k_batched
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma_load(q_desc, [qb, q_row0 + start_m, h, 0], q_bar, q_smem)
        bt_row = BlockTable + b.to(gl.int64) * stride_btb
        pages_layout: gl.constexpr = gl.BlockedLayout([BLOCK_N // BOX], [32], [num_warps], [0])
        for s in gl.static_range(STAGES):
            pages = _tile_pages(s, bt_row, k_len, s < n_tiles, BLOCK_N, BOX, PAGE_SIZE, PAGED, pages_layout)
            _load_tile(s, s, s < n_tiles, pages, k_desc, k_smem, k_bar, kb, k_row0, kv_head, BLOCK_N, BOX, PAGE_SIZE,
                       PAGED)
            _load_tile(s, s, s < n_tiles, pages, v_desc, v_smem, v_bar, kb, k_row0, kv_head, BLOCK_N, BOX, PAGE_SIZE,
                       PAGED)

        offs_m = gl.arange(0, BLOCK_M, layout=row_layout)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        rows = start_m + offs_m
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        mbarrier.wait(q_bar, 0)
        q_tile = q_smem.reshape([BLOCK_M, HEAD_DIM])
        if Q_IN_REGISTERS:
            q_tile = q_tile.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))

        if n_tiles > 0:
            mbarrier.wait(k_bar.index(0), 0)
            qk = warpgroup_mma(q_tile, k_smem.index(0).permute((1, 0)), s_zero,
                               use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            if n_full == 0:
                qk = _mask_scores(qk, 0, rows, offs_n, k_len, diag, BLOCK_N, CAUSAL)
            m_i, l_i, p, alpha = _fold(qk, m_i, l_i, qk_scale)
            # Tiles 1 .. n_full - 1 are seen whole by every row; the rest are masked.
            for j in range(0, gl.minimum(n_full, n_tiles) - 1):
                acc, m_i, l_i, p = _step(j, acc, m_i, l_i, p, q_tile, k_smem, v_smem, k_bar, v_bar,
                                         k_desc, v_desc, kb, k_row0, kv_head, bt_row, n_tiles, rows, offs_n, k_len,
                                         diag, qk_scale, s_zero, False, CAUSAL, BLOCK_N, HEAD_DIM, STAGES, BOX,
                                         PAGE_SIZE, PAGED, pages_layout, p_layout, o_layout)
            for j in range(gl.maximum(n_full, 1) - 1, n_tiles - 1):
                acc, m_i, l_i, p = _step(j, acc, m_i, l_i, p, q_tile, k_smem, v_smem, k_bar, v_bar,
                                         k_desc, v_desc, kb, k_row0, kv_head, bt_row, n_tiles, rows, offs_n, k_len,
                                         diag, qk_scale, s_zero, True, CAUSAL, BLOCK_N, HEAD_DIM, STAGES, BOX,
                                         PAGE_SIZE, PAGED, pages_layout, p_layout, o_layout)
            last = n_tiles - 1
            mbarrier.wait(v_bar.index(last % STAGES), (last // STAGES) & 1)
            v_last = v_smem.index(last % STAGES)
            if (last + 1) * BLOCK_N > k_len:
                _zero_tail_values(v_last, last, k_len, BLOCK_N)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_last, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

        _store_rows(acc, m_i, l_i, Out, Lse, b, h, q_row0, start_m, q_len, stride_ob, stride_os, stride_oh, stride_lb,
                    stride_lh, stride_ls, o_layout)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(k_bar.index(s))
            mbarrier.invalidate(v_bar.index(s))
        mbarrier.invalidate(q_bar)


    @gluon.jit
    def _ws_item(pair, half, q_len_ptr, k_len_ptr, num_heads, num_m_tiles, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """(b, h, start_m, q_len, k_len, n_tiles, valid) of half ``half`` of work pair ``pair``: a pair is query tiles
        p and num_m_tiles - 1 - p of one (sequence, head), the longer first, so that causal pairs cost about the same
        (the middle tile of an odd count pairs with itself: its second half is not valid)."""
        pairs_per_head = (num_m_tiles + 1) // 2
        bh = pair // pairs_per_head
        p = pair % pairs_per_head
        m_tile = gl.where(half == 0, num_m_tiles - 1 - p, p)
        valid = (half == 0) | (p != num_m_tiles - 1 - p)
        b = bh // num_heads
        q_len = gl.load(q_len_ptr + b)
        start_m = m_tile * BLOCK_M
        k_len = gl.load(k_len_ptr + b)
        n_tiles, _ = _key_tiles(start_m, BLOCK_M, q_len, k_len, BLOCK_N, CAUSAL)
        return b, bh % num_heads, start_m, q_len, k_len, n_tiles, valid & (start_m < q_len)

    @gluon.jit
    def _ws_load_item(q_desc, k_desc, v_desc, smem, bars, bt_row, qb, q_row, h, kb, k_row0, kv_head, k_len, n_tiles,
                      ring, items, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr):
        """The producer's share of one work item: its Q once both consumers are done with the last item's, then each
        key tile's K and V into the ring (``ring``: key tiles loaded before it); a slot's K is refilled once both
        consumer warpgroups are past their score MMAs on it, its V once they are past their value MMAs."""
        q_smem, k_smem, v_smem = smem
        q_bar, q_empty, k_full, v_full, k_empty, v_empty, turns = bars
        STAGES: gl.constexpr = k_smem.shape[0]
        BOX: gl.constexpr = k_desc.block_type.shape[1]
        pages_layout: gl.constexpr = gl.BlockedLayout([BLOCK_N // BOX], [32], [1], [0])
        mbarrier.wait(q_empty, (items & 1) ^ 1)  # a fresh mbarrier passes a wait for the phase before its first
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma_load(q_desc, [qb, q_row, h, 0], q_bar, q_smem)
        for t in range(n_tiles):
            slot = (ring + t) % STAGES
            released = (((ring + t) // STAGES) & 1) ^ 1
            pages = _tile_pages(t, bt_row, k_len, True, BLOCK_N, BOX, PAGE_SIZE, PAGED, pages_layout)
            mbarrier.wait(k_empty.index(slot), released)
            _load_tile(t, slot, True, pages, k_desc, k_smem, k_full, kb, k_row0, kv_head, BLOCK_N, BOX, PAGE_SIZE,
                       PAGED)
            mbarrier.wait(v_empty.index(slot), released)
            _load_tile(t, slot, True, pages, v_desc, v_smem, v_full, kb, k_row0, kv_head, BLOCK_N, BOX, PAGE_SIZE,
                       PAGED)

    @gluon.jit
    def _ws_load(q_desc, k_desc, v_desc, smem, bars, BlockTable, stride_btb, q_start_ptr, q_len_ptr, k_start_ptr,
                 k_len_ptr, num_heads, group, num_m_tiles, num_pairs, q_batched, k_batched, BLOCK_N: gl.constexpr,
                 CAUSAL: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr):
        """The producer warp: every TMA copy of the program's work items, in the consumers' order."""
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
        ring = 0
        items = 0
        for pair in range(gl.program_id(0), num_pairs, gl.num_programs(0)):
            for half in range(2):
                b, h, start_m, q_len, k_len, n_tiles, valid = _ws_item(pair, half, q_len_ptr, k_len_ptr, num_heads,
                                                                       num_m_tiles, BLOCK_M, BLOCK_N, CAUSAL)
                if valid:
                    _ws_load_item(q_desc, k_desc, v_desc, smem, bars, BlockTable + b.to(gl.int64) * stride_btb,
                                  b * q_batched, gl.load(q_start_ptr + b) + start_m, h, b * k_batched,
                                  gl.load(k_start_ptr + b), h // group, k_len, n_tiles, ring, items, BLOCK_N,
                                  PAGE_SIZE, PAGED)
                    ring += n_tiles
                    items += 1

    @gluon.jit
    def _ws_step(j, ring, turn, acc, m_i, l_i, p_op, q_tile, smem, bars, my_turn, next_turn, rows, offs_n, k_len,
                 diag, qk_scale, s_zero, MASKED: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
                 p_layout: gl.constexpr, o_layout: gl.constexpr):
        """A consumer's turn j + 1 of a work item (``ring``: key tiles of earlier items, ``turn``: turns taken
        before it): in its turn, it issues the scores of key tile j + 1 and the value MMA of tile j (weights ``p_op``)
        and hands the turn over; then folds tile j + 1 while the other warpgroup issues."""
        q_smem, k_smem, v_smem = smem
        q_bar, q_empty, k_full, v_full, k_empty, v_empty, turns = bars
        STAGES: gl.constexpr = k_smem.shape[0]
        slot = (ring + j) % STAGES
        nxt = (ring + j + 1) % STAGES
        mbarrier.wait(k_full.index(nxt), ((ring + j + 1) // STAGES) & 1)
        mbarrier.wait(v_full.index(slot), ((ring + j) // STAGES) & 1)
        mbarrier.wait(my_turn, (turn + j + 1) & 1)
        qk = warpgroup_mma(q_tile, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_smem.index(slot), acc, is_async=True)
        mbarrier.arrive(next_turn)
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))
        mbarrier.arrive(k_empty.index(nxt))
        if MASKED:
            qk = _mask_scores(qk, j + 1, rows, offs_n, k_len, diag, BLOCK_N, CAUSAL)
        m_i, l_i, p, alpha = _fold(qk, m_i, l_i, qk_scale)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(slot))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        return acc, m_i, l_i, gl.convert_layout(p.to(k_smem.dtype), p_layout)

    @gluon.jit
    def _ws_consume_item(WG: gl.constexpr, smem, bars, Out, Lse, strides, b, h, q_row0, start_m, q_len, k_len,
                         n_tiles, qk_scale, ring, turn, items, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr):
        """Consumer warpgroup WG's share of one work item: query rows start_m + 64 WG .. + 63 of its 128 over its
        n_tiles key tiles (both warpgroups take the same number of turns), then their out and lse."""
        q_smem, k_smem, v_smem = smem
        q_bar, q_empty, k_full, v_full, k_empty, v_empty, turns = bars
        ROWS: gl.constexpr = 16 * gl.num_warps()
        HEAD_DIM: gl.constexpr = k_smem.shape[2]
        STAGES: gl.constexpr = k_smem.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        my_turn = turns.index(WG)
        next_turn = turns.index(1 - WG)

        wg_start = start_m + WG * ROWS
        diag = k_len - q_len
        _, n_full = _key_tiles(wg_start, ROWS, q_len, k_len, BLOCK_N, CAUSAL)
        rows = wg_start + gl.arange(0, ROWS, layout=row_layout)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([ROWS], gl.float32, row_layout)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        q_tile = q_smem.reshape([2 * ROWS, HEAD_DIM]).slice(WG * ROWS, ROWS)
        mbarrier.wait(q_bar, items & 1)
        if n_tiles > 0:
            mbarrier.wait(k_full.index(ring % STAGES), (ring // STAGES) & 1)
            mbarrier.wait(my_turn, turn & 1)
            qk = warpgroup_mma(q_tile, k_smem.index(ring % STAGES).permute((1, 0)), s_zero, use_acc=False,
                               is_async=True)
            mbarrier.arrive(next_turn)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            mbarrier.arrive(k_empty.index(ring % STAGES))
            if n_full == 0:
                qk = _mask_scores(qk, 0, rows, offs_n, k_len, diag, BLOCK_N, CAUSAL)
            m_i, l_i, p, alpha = _fold(qk, m_i, l_i, qk_scale)
            p_op = gl.convert_layout(p.to(k_smem.dtype), p_layout)
            for j in range(0, gl.minimum(n_full, n_tiles) - 1):
                acc, m_i, l_i, p_op = _ws_step(j, ring, turn, acc, m_i, l_i, p_op, q_tile, smem, bars, my_turn,
                                               next_turn, rows, offs_n, k_len, diag, qk_scale, s_zero, False, CAUSAL,
                                               BLOCK_N, p_layout, o_layout)
            for j in range(gl.maximum(n_full, 1) - 1, n_tiles - 1):
                acc, m_i, l_i, p_op = _ws_step(j, ring, turn, acc, m_i, l_i, p_op, q_tile, smem, bars, my_turn,
                                               next_turn, rows, offs_n, k_len, diag, qk_scale, s_zero, True, CAUSAL,
                                               BLOCK_N, p_layout, o_layout)
            last = n_tiles - 1
            last_slot = (ring + last) % STAGES
            mbarrier.wait(v_full.index(last_slot), ((ring + last) // STAGES) & 1)
            v_last = v_smem.index(last_slot)
            if (last + 1) * BLOCK_N > k_len:
                # Both warpgroups write the same zeros: whichever's writes an MMA sees, it reads zeros.
                _zero_tail_values(v_last, last, k_len, BLOCK_N)
            mbarrier.wait(my_turn, (turn + n_tiles) & 1)
            acc = warpgroup_mma(p_op, v_last, acc, is_async=True)
            mbarrier.arrive(next_turn)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(v_empty.index(last_slot))
        mbarrier.arrive(q_empty)  # every MMA of this warpgroup that read Q is done
        stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls = strides
        _store_rows(acc, m_i, l_i, Out, Lse, b, h, q_row0, wg_start, q_len, stride_ob, stride_os, stride_oh, stride_lb,
                    stride_lh, stride_ls, o_layout)

    @gluon.jit
    def _ws_consume(WG: gl.constexpr, smem, bars, Out, Lse, strides, q_start_ptr, q_len_ptr, k_len_ptr, num_heads,
                    num_m_tiles, num_pairs, qk_scale, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr):
        """Consumer warpgroup WG over the program's work items."""
        turns = bars[6]
        if WG == 1:
            mbarrier.arrive(turns.index(0))  # warpgroup 0 takes the first turn
        BLOCK_M: gl.constexpr = 32 * gl.num_warps()
        ring = 0
        turn = 0
        items = 0
        for pair in range(gl.program_id(0), num_pairs, gl.num_programs(0)):
            for half in range(2):
                b, h, start_m, q_len, k_len, n_tiles, valid = _ws_item(pair, half, q_len_ptr, k_len_ptr, num_heads,
                                                                       num_m_tiles, BLOCK_M, BLOCK_N, CAUSAL)
                if valid:
                    _ws_consume_item(WG, smem, bars, Out, Lse, strides, b, h, gl.load(q_start_ptr + b), start_m,
                                     q_len, k_len, n_tiles, qk_scale, ring, turn, items, CAUSAL, BLOCK_N)
                    ring += n_tiles
                    turn += gl.where(n_tiles > 0, n_tiles + 1, 0)
                    items += 1

    @gluon.jit
    def _ws_consume_first_rows(smem, bars, Out, Lse, strides, q_start_ptr, q_len_ptr, k_len_ptr, num_heads,
                               num_m_tiles, num_pairs, qk_scale, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr):
        _ws_consume(0, smem, bars, Out, Lse, strides, q_start_ptr, q_len_ptr, k_len_ptr, num_heads, num_m_tiles,
                    num_pairs, qk_scale, CAUSAL, BLOCK_N)

    @gluon.jit
    def _ws_consume_last_rows(smem, bars, Out, Lse, strides, q_start_ptr, q_len_ptr, k_len_ptr, num_heads,
                              num_m_tiles, num_pairs, qk_scale, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr):
        _ws_consume(1, smem, bars, Out, Lse, strides, q_start_ptr, q_len_ptr, k_len_ptr, num_heads, num_m_tiles,
                    num_pairs, qk_scale, CAUSAL, BLOCK_N)

    @gluon.jit
    def _prefill_sm90_ws_kernel(q_desc, k_desc, v_desc, Out, Lse, BlockTable, q_start_ptr, q_len_ptr, k_start_ptr,
                                k_len_ptr, stride_btb, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                                stride_ls, num_heads, group, num_m_tiles, q_batched, k_batched, qk_scale, num_pairs,
                                CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_IN_REGISTERS: gl.constexpr,
                                PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr, num_warps: gl.constexpr):
        """``_prefill_sm90_kernel``'s arguments and results, warp-specialized and persistent: each program takes the
        work pairs (``_ws_item``) pid, pid + grid, ...; the default partition and one worker partition are the two
        consumer warpgroups (64 query rows each), a one-warp worker partition the producer."""
        gl.static_assert(BLOCK_M == 32 * num_warps, "two consumer warpgroups of num_warps warps, 16 rows a warp")
        gl.static_assert(not Q_IN_REGISTERS, "the consumers read Q from shared memory")
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # whose MMAs go next
        mbarrier.init(q_bar, count=1)
        mbarrier.init(q_empty, count=2)  # one arrival per consumer warpgroup
        for s in gl.static_range(STAGES):
            mbarrier.init(k_full.index(s), count=1)
            mbarrier.init(v_full.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=2)
            mbarrier.init(v_empty.index(s), count=2)
        for c in gl.static_range(2):
            mbarrier.init(turns.index(c), count=1)
        smem = (q_smem, k_smem, v_smem)
        bars = (q_bar, q_empty, k_full, v_full, k_empty, v_empty, turns)
        strides = (stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls)
        # Constexprs are written into the calls' tuples: Triton 3.6 makes tensors of those in a tuple variable.
        gl.warp_specialize([
            (_ws_consume_first_rows, (smem, bars, Out, Lse, strides, q_start_ptr, q_len_ptr, k_len_ptr, num_heads,
                                      num_m_tiles, num_pairs, qk_scale, CAUSAL, BLOCK_N)),
            (_ws_consume_last_rows, (smem, bars, Out, Lse, strides, q_start_ptr, q_len_ptr, k_len_ptr, num_heads,
                                     num_m_tiles, num_pairs, qk_scale, CAUSAL, BLOCK_N)),
            (_ws_load, (q_desc, k_desc, v_desc, smem, bars, BlockTable, stride_btb, q_start_ptr, q_len_ptr,
                        k_start_ptr, k_len_ptr, num_heads, group, num_m_tiles, num_pairs, q_batched, k_batched,
                        BLOCK_N, CAUSAL, PAGE_SIZE, PAGED)),
        ], [num_warps, 1], [WS_CONSUMER_REGISTERS, WS_PRODUCER_REGISTERS])


@functools.cache
def _say_unusable(reason):
    logging.getLogger("hf_flash").warning(
        "hf_flash: with this Triton (%s) %s; Hopper prefill runs the Triton kernel instead", triton.__version__, reason)


@functools.cache
def box_layout(rows, cols, element):
    """The shared-memory layout of a TMA box ``[1, rows, 1, cols]`` of ``element``s; cached: building one takes
    microseconds, three times a launch."""
    return gl.NVMMASharedLayout.get_default_for([1, rows, 1, cols], element)


def _box_rows(config, k, block_table):
    """Rows of K/V one TMA box of ``config``'s kernel carries: a whole key tile, or (paged) the part of it in one
    page; 0 if the pages neither hold whole tiles nor split them evenly (or are smaller than ``MIN_BOX_ROWS``)."""
    if block_table is None:
        return config.block_n
    page_size = k.shape[1]
    if page_size % config.block_n == 0:
        return config.block_n
    fits = config.block_n % page_size == 0 and page_size >= MIN_BOX_ROWS[config.warp_specialized]
    return page_size if fits else 0


def sm90_path(q, k, v, out, *, causal, window_left, window_right, softcap, softmax_scale, block_table=None):
    """Whether ``prefill_sm90`` serves this call: Gluon importable, an sm90 GPU (not the interpreter), 16-bit Q/K/V,
    head dim in ``SM90_HEAD_DIMS``, causal or full (no window), no soft-cap, a positive scale, K/V dense or in pages
    that hold whole key tiles or split them evenly (at least ``MIN_BOX_ROWS`` rows for the kernel), and Q, K, V at
    16-byte aligned addresses with 16-byte aligned strides (TMA's rule)."""
    if (INTERPRET or not q.is_cuda or q.dtype not in SM90_DTYPES or q.shape[-1] not in SM90_HEAD_DIMS or softcap > 0
            or softmax_scale <= 0):
        return False
    if window_left >= 0 or (window_right >= 0 and not causal):
        return False
    if not all(_box_rows(SM90_CONFIGS[q.shape[-1], long], k, block_table) for long in (False, True)):
        return False
    if device_properties(q.device).major != 9:
        return False
    if GLUON_ERROR is not None:
        _say_unusable(f"Gluon does not import ({GLUON_ERROR})")
        return False
    if COMPILE_ERROR is not None:  # said by prefill_sm90
        return False
    return all(tma_aligned(t, t.stride()[:-1]) for t in (q, k, v))


def prefill_sm90(q, k, v, out, lse, q_start, q_len, k_start, k_len, max_seqlen_q, *, softmax_scale: float,
                 causal: bool, block_table=None) -> bool:
    """``prefill`` for the calls ``sm90_path`` accepts: same tensors, layouts and results. Returns False, having
    launched nothing, when this Triton cannot compile the kernel (Gluon's names move between releases): it says why
    once, and ``sm90_path`` turns every later call away."""
    global COMPILE_ERROR
    batch, (num_heads, head_dim) = q_len.shape[0], q.shape[2:]
    config = SM90_CONFIGS[head_dim, max_seqlen_q >= SM90_LONG_SEQLEN]
    block_m, block_n = config.block_m, config.block_n
    kernel = _prefill_sm90_ws_kernel if config.warp_specialized else _prefill_sm90_kernel
    element = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    paged = block_table is not None

    def descriptor(t, rows, cols=head_dim):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, cols], box_layout(rows, cols, element))

    box = _box_rows(config, k, block_table)
    cols = head_dim if box == block_n else KV_BOX_COLS  # whole-tile boxes as one copy: 2-5 % faster at D128 than two
    num_m_tiles = triton.cdiv(max_seqlen_q, block_m)
    grid = (batch * num_heads * num_m_tiles,)
    work = ()  # the persistent kernel's last runtime argument, positional: launch keys take keywords as they are
    if config.warp_specialized:  # persistent: one program per SM
        num_pairs = batch * num_heads * ((num_m_tiles + 1) // 2)
        grid = (min(num_pairs, device_properties(q.device).multi_processor_count),)
        work = (num_pairs,)
    try:
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            launch(
                kernel, grid, descriptor(q, block_m), descriptor(k, box, cols), descriptor(v, box, cols), out, lse,
                block_table if paged else q_len, q_start, q_len, k_start, k_len, block_table.stride(0) if paged else 0,
                batch_stride(out), out.stride(1), out.stride(2), batch_stride(lse), lse.stride(1), lse.stride(2),
                num_heads, num_heads // k.shape[2], num_m_tiles, int(q.shape[0] > 1), int(k.shape[0] > 1 and not paged),
                softmax_scale * LOG2E, *work,
                CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=config.stages,
                Q_IN_REGISTERS=config.q_in_registers, PAGE_SIZE=k.shape[1] if paged else 1, PAGED=paged,
                num_warps=config.num_warps)
    except CompilationError as error:
        COMPILE_ERROR = error
        _say_unusable(f"its Gluon kernel does not compile ({str(error).strip().splitlines()[-1]})")
        return False
    return True

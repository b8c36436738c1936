"""Attention-state merging: (o_a, lse_a) and (o_b, lse_b), attention over two disjoint key sets, combine into the
state over their union. lse is natural-log; -inf marks an empty state, whose output is ignored (never 0 * NaN). A NaN
lse makes the merged output and lse NaN: weights and sums are tested with == 0, never > 0, which NaN would fail."""
import contextlib

import torch
import triton
import triton.language as tl

from . import launch

MAX_TILE = 2048  # elements of one program's [BLOCK_H, BLOCK_D] tile: 16 per thread at 4 warps


@triton.jit
def merge_weights(lse_a, lse_b):
    """Weights of two states in their merge and the merged lse: ``(w_a, w_b, lse)`` with ``w_x = exp(lse_x - lse)``.
    Both empty gives weights 0 and lse -inf (no NaN); a NaN lse gives NaN weights and lse. Works elementwise on any
    shape."""
    m = tl.maximum(lse_a, lse_b)  # may drop a NaN (maxnum on GPUs): exp(NaN - m) below brings it back
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # both empty: exp(-inf - 0) = 0 instead of exp(NaN)
    e_a = tl.exp(lse_a - m_safe)
    e_b = tl.exp(lse_b - m_safe)
    total = e_a + e_b  # >= 1 unless both states are empty (then e_a = e_b = 0); NaN with a NaN lse
    empty = total == 0.0
    total = tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(total))
    return e_a / total, e_b / total, lse


@triton.jit
def merge_outputs(o_a, w_a, o_b, w_b):
    """``w_a * o_a + w_b * o_b`` where a zero weight drops its output entirely (an empty state's may be garbage) and a
    NaN weight makes it NaN. Weights must already be broadcastable against the outputs."""
    return tl.where(w_a == 0.0, 0.0, w_a * o_a) + tl.where(w_b == 0.0, 0.0, w_b * o_b)


@triton.jit
def merge_many(o, lse):
    """Merges the states along axis 0 of ``o`` ``[S, D]`` / ``lse`` ``[S]`` (fp32) in one step: ``(o [D], lse)``.
    All empty gives 0 and -inf; a NaN lse gives NaN."""
    m = tl.max(lse, 0)  # may drop a NaN (maxnum on GPUs): exp(NaN - m) below brings it back
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, 0)  # >= 1 unless every state is empty (then every w = 0); NaN with a NaN lse
    empty = total == 0.0
    total = tl.where(empty, 1.0, total)
    out = tl.sum(tl.where(w[:, None] == 0.0, 0.0, w[:, None] * o), 0) / total
    return out, tl.where(empty, float("-inf"), m_safe + tl.log(total))


@triton.jit
def _merge_kernel(OutA, LseA, OutB, LseB, Out, Lse, num_heads,
                  stride_at, stride_ah, stride_bt, stride_bh, stride_ot, stride_oh,
                  stride_lat, stride_lah, stride_lbt, stride_lbh, stride_lt, stride_lh,
                  HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # Out* [T, H, D] (unit last stride), Lse* [T, H] float32. One program per (token, block of BLOCK_H heads).
    t = tl.program_id(0).to(tl.int64)  # int64: T * stride_t can pass 2^31
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < num_heads
    ok = h_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    lse_a = tl.load(LseA + t * stride_lat + offs_h * stride_lah, mask=h_ok, other=float("-inf"))
    lse_b = tl.load(LseB + t * stride_lbt + offs_h * stride_lbh, mask=h_ok, other=float("-inf"))
    o_a = tl.load(OutA + t * stride_at + (offs_h * stride_ah)[:, None] + offs_d[None, :], mask=ok, other=0.0)
    o_b = tl.load(OutB + t * stride_bt + (offs_h * stride_bh)[:, None] + offs_d[None, :], mask=ok, other=0.0)
    w_a, w_b, lse = merge_weights(lse_a, lse_b)
    out = merge_outputs(o_a.to(tl.float32), w_a[:, None], o_b.to(tl.float32), w_b[:, None])
    tl.store(Out + t * stride_ot + (offs_h * stride_oh)[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=ok)
    tl.store(Lse + t * stride_lt + offs_h * stride_lh, lse, mask=h_ok)


def merge_state(out_a, lse_a, out_b, lse_b, out, lse) -> None:
    """Writes the merge of (out_a, lse_a) and (out_b, lse_b) into ``out`` ``[T, H, D]`` (its dtype) and ``lse``
    ``[T, H]`` float32: ``lse = log(exp(lse_a) + exp(lse_b))``, ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse)
    * out_b``; both empty gives 0 and -inf."""
    tokens, num_heads, head_dim = out_a.shape
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, MAX_TILE // block_d))
    grid = (tokens, triton.cdiv(num_heads, block_h))
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        launch(
            _merge_kernel, grid, out_a, lse_a, out_b, lse_b, out, lse, num_heads,
            out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1), out.stride(0), out.stride(1),
            lse_a.stride(0), lse_a.stride(1), lse_b.stride(0), lse_b.stride(1), lse.stride(0), lse.stride(1),
            HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
        )

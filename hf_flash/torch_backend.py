"""The torch path: the kernels' launchers (``hf_flash.kernels``) re-done with torch ops, same signatures and
semantics, for tensors on devices where no Triton kernel runs (CPU without ``TRITON_INTERPRET=1``).

Attention is computed per sequence in blocks of queries and keys with an online softmax in float32, so memory stays
O(BLOCK^2) per head instead of O(q_len x k_len), and blocks no query of a block can see are skipped.
"""
import math

import torch

BLOCK = 256  # query rows and keys per block; the fastest of 128..1024 on the main job (2 CPU cores)


def _entry(t, b):
    """Sequence ``b``'s batch entry of a token tensor: a batch of 1 is shared by every sequence (packed varlen)."""
    return t[b if t.shape[0] > 1 else 0]


def _keys(k, v, b, k_start, k_len, block_table):
    """Sequence ``b``'s keys and values as ``[k_len, H, D]``, gathered from pages if ``block_table`` is given."""
    if block_table is None:
        return _entry(k, b)[k_start : k_start + k_len], _entry(v, b)[k_start : k_start + k_len]
    page_size = k.shape[1]
    pages = block_table[b, : math.ceil(k_len / page_size)].long()
    kb = k[pages].flatten(0, 1)[:k_len]
    vb = v[pages].flatten(0, 1)[:k_len]
    return kb, vb


def _visible_keys(row_lo, row_hi, sk, *, right, window_left):
    """Keys [lo, hi) that some query of rows (positions) [row_lo, row_hi] may see."""
    hi = sk if right < 0 else min(sk, row_hi + right + 1)
    lo = 0 if window_left < 0 else max(0, row_lo - window_left)
    return lo, hi


def _logits(scores, softmax_scale, softcap):
    return softcap * torch.tanh(scores * (softmax_scale / softcap)) if softcap > 0 else scores * softmax_scale


class _OnlineSoftmax:
    """Running softmax of rows ``shape`` over key blocks: max, sum and the fp32 output accumulator."""

    def __init__(self, shape, head_dim, device):
        self.m = torch.full(shape, float("-inf"), device=device)
        self.l = torch.zeros(shape, device=device)
        self.acc = torch.zeros((*shape, head_dim), device=device)

    def add(self, s, values_times):
        """Fold in a block of logits ``s`` ``[*shape, n]`` (-inf where hidden); ``values_times(p)`` is p @ V."""
        m_new = torch.maximum(self.m, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing visible yet stay at zero
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(self.m - m_safe)
        self.l = self.l * alpha + p.sum(-1)
        self.acc = self.acc * alpha[..., None] + values_times(p)
        self.m = m_new

    def result(self):
        """(out, lse); a row that saw no key (sum exactly 0) gets out 0 and lse -inf, whatever its blocks' hidden
        values held. NaN or inf in a score or value the row sees reaches its out and lse, as in the kernels."""
        empty = self.l == 0
        l_safe = self.l.masked_fill(empty, 1.0)
        out = torch.where(empty[..., None], 0.0, self.acc / l_safe[..., None])
        return out, torch.where(empty, float("-inf"), self.m + torch.log(l_safe))


def _attend(q, k, v, *, softmax_scale, causal, window_left, window_right, softcap):
    """One sequence: q ``[Sq, Hq, D]``, k/v ``[Sk, Hkv, D]`` -> (out ``[Sq, Hq, D]`` fp32, lse ``[Hq, Sq]``).

    Queries go BLOCK rows at a time over only the key blocks they can see (about half of them when causal), and only
    blocks that straddle the mask's edge build a mask."""
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    g = hq // hkv
    # Query heads grouped by their KV head, [Hkv, G, Sq, D]: K/V are never repeated.
    qg = q.float().permute(1, 0, 2).reshape(hkv, g, sq, d)
    right = (0 if window_right < 0 else min(window_right, 0)) if causal else window_right
    out = torch.zeros((hkv, g, sq, d), device=q.device)
    lse = torch.full((hkv, g, sq), float("-inf"), device=q.device)
    for q0 in range(0, sq, BLOCK):
        n_rows = min(BLOCK, sq - q0)
        row_lo, row_hi = q0 + sk - sq, q0 + n_rows - 1 + sk - sq  # bottom-right aligned positions of the block
        qb = qg[:, :, q0 : q0 + n_rows].reshape(hkv, g * n_rows, d)
        state = _OnlineSoftmax((hkv, g * n_rows), d, q.device)
        lo, hi = _visible_keys(row_lo, row_hi, sk, right=right, window_left=window_left)
        for start in range(lo - lo % BLOCK, hi, BLOCK):
            end = min(start + BLOCK, hi)
            kb = k[start:end].float().permute(1, 2, 0)  # [Hkv, D, n]
            vb = v[start:end].float().permute(1, 0, 2)  # [Hkv, n, D]
            s = _logits(torch.bmm(qb, kb), softmax_scale, softcap)
            # Every row sees every key of the block unless the block crosses the window's or the causal edge.
            if (right >= 0 and end - 1 > row_lo + right) or (window_left >= 0 and start < row_hi - window_left):
                rows = torch.arange(row_lo, row_hi + 1, device=q.device)
                col = torch.arange(start, end, device=q.device)
                keep = torch.ones(n_rows, end - start, dtype=torch.bool, device=q.device)
                if right >= 0:
                    keep &= col[None, :] <= rows[:, None] + right
                if window_left >= 0:
                    keep &= col[None, :] >= rows[:, None] - window_left
                s = s.masked_fill(~keep.repeat(g, 1), float("-inf"))
            state.add(s, lambda p, vb=vb: torch.bmm(p, vb))
        block_out, block_lse = state.result()
        out[:, :, q0 : q0 + n_rows] = block_out.view(hkv, g, n_rows, d)
        lse[:, :, q0 : q0 + n_rows] = block_lse.view(hkv, g, n_rows)
    return out.reshape(hq, sq, d).permute(1, 0, 2), lse.reshape(hq, sq)


def prefill(q, k, v, out, lse, q_start, q_len, k_start, k_len, max_seqlen_q, *,
            softmax_scale, causal, window_left, window_right, softcap, block_table=None):
    """Torch twin of ``hf_flash.kernels.prefill.prefill``."""
    starts_q, lens_q, starts_k, lens_k = torch.stack([q_start, q_len, k_start, k_len]).tolist()
    for b in range(len(lens_q)):
        qs, ql = starts_q[b], lens_q[b]
        if ql == 0:
            continue
        kb, vb = _keys(k, v, b, starts_k[b], lens_k[b], block_table)
        o, s = _attend(_entry(q, b)[qs : qs + ql], kb, vb, softmax_scale=softmax_scale, causal=causal,
                       window_left=window_left, window_right=window_right, softcap=softcap)
        _entry(out, b)[qs : qs + ql] = o.to(out.dtype)
        _entry(lse, b)[:, qs : qs + ql] = s


def paged_decode(q, k_pool, v_pool, block_table, seqlens, out, lse, *, softmax_scale, window_left, softcap,
                 num_splits):
    """Torch twin of ``hf_flash.kernels.decode.paged_decode``: one query per sequence, the whole batch at once over
    BLOCK keys at a time, gathered through the block table (a handful of ops per block rather than a loop over the
    sequences; splits are moot here)."""
    batch, hq, d = q.shape
    page_size, hkv = k_pool.shape[1], k_pool.shape[2]
    g = hq // hkv
    lens = seqlens.long()
    first = (lens - 1 - window_left).clamp_min(0) if window_left >= 0 else torch.zeros_like(lens)
    table = block_table.long()
    k_rows, v_rows = k_pool.flatten(0, 1), v_pool.flatten(0, 1)  # slot page * page_size + row
    qg = q.float().view(batch, hkv, g, d)
    state = _OnlineSoftmax((batch, hkv, g), d, q.device)
    longest = int(lens.max()) if batch else 0
    for start in range(0, longest, BLOCK):
        col = torch.arange(start, min(start + BLOCK, longest), device=q.device)
        keep = (col[None, :] < lens[:, None]) & (col[None, :] >= first[:, None])  # [B, n]
        slot = torch.where(keep, table[:, col // page_size] * page_size + col % page_size, 0)
        # Hidden keys are zeroed, not only masked: a pool may hold anything (NaN) where no token is stored.
        kb = k_rows[slot].float().masked_fill(~keep[..., None, None], 0.0)  # [B, n, Hkv, D]
        vb = v_rows[slot].float().masked_fill(~keep[..., None, None], 0.0)
        s = _logits(torch.einsum("bhgd,bnhd->bhgn", qg, kb), softmax_scale, softcap)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        state.add(s, lambda p, vb=vb: torch.einsum("bhgn,bnhd->bhgd", p, vb))
    seq_out, seq_lse = state.result()
    out.copy_(seq_out.view(batch, hq, d))
    lse.copy_(seq_lse.view(batch, hq))


def merge_state(out_a, lse_a, out_b, lse_b, out, lse):
    """Torch twin of ``hf_flash.kernels.merge.merge_state``: an empty state (lse -inf) is dropped, output and all;
    a NaN lse makes out and lse NaN."""
    m = torch.maximum(lse_a, lse_b)  # NaN if either is
    m_safe = m.masked_fill(m == float("-inf"), 0.0)  # both empty: exp(-inf - 0) = 0 instead of exp(NaN)
    e_a, e_b = torch.exp(lse_a - m_safe), torch.exp(lse_b - m_safe)
    total = e_a + e_b  # >= 1 unless both states are empty, NaN with a NaN lse
    empty = total == 0
    total = total.masked_fill(empty, 1.0)
    w_a, w_b = (e_a / total)[..., None], (e_b / total)[..., None]
    # A zero weight drops its output (an empty state's may be garbage); a NaN weight is kept.
    out.copy_(torch.where(w_a == 0, 0.0, w_a * out_a.float()) + torch.where(w_b == 0, 0.0, w_b * out_b.float()))
    lse.copy_(torch.where(empty, float("-inf"), m_safe + torch.log(total)))


def write_pages(k_new, v_new, k_pool, v_pool, slot_mapping):
    """Torch twin of ``hf_flash.kernels.paged_kv.write_pages``."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    page_size = k_pool.shape[1]
    pages, rows = slots // page_size, slots % page_size
    k_pool[pages, rows] = k_new[keep].to(k_pool.dtype)
    v_pool[pages, rows] = v_new[keep].to(v_pool.dtype)


def append_pages(k_new, v_new, k_pool, v_pool, block_table, cache_seqlens, q_start):
    """Torch twin of ``hf_flash.kernels.paged_kv.append_pages``: the slots computed here, then ``write_pages``."""
    batch, page_size = block_table.shape[0], k_pool.shape[1]
    if q_start is not None:  # packed: token i of the batch belongs to the last sequence starting at or before it
        index = torch.arange(k_new.shape[0], device=k_new.device)
        seq = torch.searchsorted(q_start.long(), index, right=True) - 1
        pos = index - q_start.long()[seq] + cache_seqlens.long()[seq]
    else:
        seqlen = k_new.shape[1]
        seq = torch.arange(batch, device=k_new.device).repeat_interleave(seqlen)
        pos = (cache_seqlens.long()[:, None] + torch.arange(seqlen, device=k_new.device)).flatten()
        k_new, v_new = k_new.flatten(0, 1), v_new.flatten(0, 1)
    write_pages(k_new, v_new, k_pool, v_pool, block_table.long()[seq, pos // page_size] * page_size + pos % page_size)


def program_slots(head_dim, dtype, device):
    """The torch path attends each sequence whole: one program."""
    return 1


def choose_num_splits(batch, num_kv_heads, max_seqlen, slots, head_dim):
    """The torch path attends each sequence whole: no split."""
    return 1

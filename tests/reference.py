"""Independent float64 references for the tests: naive attention with an explicit mask, no tiling, no code
shared with hf_flash."""
import math

import torch


def visible(q_len, k_len, *, causal, window=(-1, -1), device="cpu"):
    """Bool ``[q_len, k_len]``: which keys each query sees (bottom-right aligned causal / window)."""
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        keep &= j <= i + right
    if left >= 0:
        keep &= j >= i - left
    return keep


def attention_ref(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, scale=None, key_mask=None):
    """One sequence in float64. q ``[Sq, Hq, D]``, k/v ``[Sk, Hkv, D]``; GQA by head groups.

    ``key_mask`` (bool ``[Sk]``) hides keys (padding). Returns ``(out [Sq, Hq, D] float64, lse [Hq, Sq]
    float64)``; rows that see no key give 0 and ``-inf``.
    """
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    g = hq // hkv
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k)
    if softcap > 0:
        s = softcap * torch.tanh(s * scale / softcap)
    else:
        s = s * scale
    keep = visible(sq, sk, causal=causal, window=window, device=q.device)
    if key_mask is not None:
        keep = keep & key_mask[None, :]
    s = s.masked_fill(~keep[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hq, Sq]
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out, lse

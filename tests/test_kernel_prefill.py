"""The Triton prefill kernel against the float64 reference, sequence by sequence: dense, varlen (packed and padded),
paged, GQA, windows, softcap, odd head dims, rows that see no key. Outputs are poisoned with NaN first, so rows the
kernel skips or writes out of place show up."""
import importlib
import math

import pytest
import torch
from hf_flash.kernels.prefill import prefill
from pages import scatter_to_pages
from reference import attention_ref

NAN = float("nan")

# |out - ref| <= atol + rtol * |ref|, ref in float64 on the same (rounded) inputs. fp32: ieee dots, so only fp32
# accumulation and exp2 rounding remain (measured ~1e-6). fp16 / bf16: P is rounded to the input dtype before P @ V
# and out is stored in it: about two half-ulps of the dtype (2^-11 fp16, 2^-8 bf16) relative, plus a floor for
# outputs near 0. lse is accumulated in fp32 from exact products of the inputs, whatever their dtype.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5}


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _run(q, k, v, q_start, q_len, k_start, k_len, *, causal=False, window=(-1, -1), softcap=0.0, block_table=None):
    """Launch on NaN-poisoned outputs, packed (a batch of 1 shared by every sequence) like q if q is; returns
    (out, lse)."""
    rows, seq_q, heads, head_dim = q.shape
    out = torch.full_like(q, NAN)
    lse = torch.full((rows, heads, seq_q), NAN, dtype=torch.float32, device=q.device)
    max_q = max(int(q_len.max()), 1)
    prefill(q, k, v, out, lse, q_start, q_len, k_start, k_len, max_q, softmax_scale=1.0 / math.sqrt(head_dim),
            causal=causal, window_left=window[0], window_right=window[1], softcap=softcap, block_table=block_table)
    return out, lse


def _check(out, lse, q, keys, q_start, q_len, *, causal=False, window=(-1, -1), softcap=0.0):
    """``keys[b]`` = sequence b's (k, v) ``[k_len, Hkv, D]``. Rows of a sequence match the reference; rows owned by
    no sequence stay NaN (untouched); rows that see no key are exactly 0 / -inf. Packed tensors have one batch entry,
    every sequence's."""
    atol, rtol = OUT_TOL[q.dtype]
    owned = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
    for b, (kb, vb) in enumerate(keys):
        entry = b if q.shape[0] > 1 else 0
        qs, ql = int(q_start[b]), int(q_len[b])
        owned[entry, qs : qs + ql] = True
        if ql == 0:
            continue
        ref_out, ref_lse = attention_ref(q[entry, qs : qs + ql], kb, vb, causal=causal, window=window,
                                         softcap=softcap)
        got_out, got_lse = out[entry, qs : qs + ql], lse[entry, :, qs : qs + ql]
        torch.testing.assert_close(got_out.double(), ref_out, atol=atol, rtol=rtol)
        torch.testing.assert_close(got_lse.double(), ref_lse, atol=LSE_TOL[q.dtype], rtol=0)  # inf must match inf
        blind = torch.isinf(ref_lse).T  # [ql, Hq]
        assert (got_out[blind] == 0).all()
    assert out[~owned].isnan().all() and lse.transpose(1, 2)[~owned].isnan().all()


def _dense(batch, seq_q, seq_k, hq, hkv, head_dim, dtype, device):
    q = torch.randn(batch, seq_q, hq, head_dim, device=device).to(dtype)
    k = torch.randn(batch, seq_k, hkv, head_dim, device=device).to(dtype)
    v = torch.randn(batch, seq_k, hkv, head_dim, device=device).to(dtype)
    return q, k, v


def _run_dense(q, k, v, **kw):
    batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
    zeros = _i32([0] * batch, q.device)
    q_len, k_len = _i32([seq_q] * batch, q.device), _i32([seq_k] * batch, q.device)
    out, lse = _run(q, k, v, zeros, q_len, zeros, k_len, **kw)
    _check(out, lse, q, [(k[b], v[b]) for b in range(batch)], zeros, q_len, **kw)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_k, hq, hkv", [(37, 37, 4, 4), (19, 53, 4, 2), (53, 19, 4, 1)])
def test_dense(dtype, causal, seq_q, seq_k, hq, hkv, device):
    # seq_q < seq_k: bottom-right aligned causal (a chunk after a prefix); seq_q > seq_k: leading rows see nothing.
    _run_dense(*_dense(2, seq_q, seq_k, hq, hkv, 64, dtype, device), causal=causal)


@pytest.mark.parametrize("head_dim, dtype", [(40, torch.bfloat16), (72, torch.float16), (80, torch.bfloat16),
                                             (96, torch.float32), (128, torch.bfloat16), (256, torch.bfloat16),
                                             (256, torch.float32), (8, torch.float16)])
def test_head_dims(head_dim, dtype, device):
    # Non-power-of-2 dims run in a padded tile with masked columns.
    _run_dense(*_dense(1, 21, 29, 2, 1, head_dim, dtype, device), causal=True)


@pytest.mark.parametrize("window", [(7, -1), (1, 3), (0, 0), (-1, 4), (17, 20)])
@pytest.mark.parametrize("causal", [False, True])
def test_window(window, causal, device):
    _run_dense(*_dense(2, 45, 61, 4, 2, 64, torch.float16, device), causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (True, (9, -1))])
def test_softcap(dtype, causal, window, device):
    q, k, v = _dense(2, 33, 47, 4, 2, 64, dtype, device)
    _run_dense(q * 2, k, v, causal=causal, window=window, softcap=1.5)  # logits ~N(0, 4): the cap bites


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_packed(causal, device):
    _run_varlen_packed([13, 0, 41, 1, 7], [13, 5, 50, 9, 0], 64, causal, device)


def _run_varlen_packed(q_lens, k_lens, head_dim, causal, device):
    """cu_seqlens-style packing: [T, H, D] as [1, T, H, D], sequences at running offsets (bf16, GQA 4/2)."""
    q_starts = [sum(q_lens[:b]) for b in range(len(q_lens))]
    k_starts = [sum(k_lens[:b]) for b in range(len(k_lens))]
    q = torch.randn(1, sum(q_lens), 4, head_dim, device=device).to(torch.bfloat16)
    k = torch.randn(1, sum(k_lens), 2, head_dim, device=device).to(torch.bfloat16)
    v = torch.randn(1, sum(k_lens), 2, head_dim, device=device).to(torch.bfloat16)
    args = [_i32(x, device) for x in (q_starts, q_lens, k_starts, k_lens)]
    out, lse = _run(q, k, v, *args, causal=causal)
    keys = [(k[0, s : s + n], v[0, s : s + n]) for s, n in zip(k_starts, k_lens)]
    _check(out, lse, q, keys, args[0], args[1], causal=causal)


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (6, 6))])
def test_padded_batch(causal, window, device):
    _run_padded_batch(64, causal, window, device)


def _run_padded_batch(head_dim, causal, window, device):
    """Left-padded batch layout: sequence b's rows end at the last position; padding rows hold NaN, so a tile that
    read one (a key or value past k_len, a query before q_start) or wrote outside its sequence would show."""
    q_lens, k_lens, seq_q, seq_k = [9, 30, 0], [20, 30, 12], 30, 34
    q, k, v = _dense(len(q_lens), seq_q, seq_k, 2, 2, head_dim, torch.float16, device)
    q_starts = [seq_q - n for n in q_lens]
    k_starts = [seq_k - 2 - n for n in k_lens]  # keys need not end at the last row either
    for b in range(len(q_lens)):
        q[b, : q_starts[b]] = NAN
        k[b, : k_starts[b]], v[b, : k_starts[b]] = NAN, NAN
        k[b, k_starts[b] + k_lens[b] :], v[b, k_starts[b] + k_lens[b] :] = NAN, NAN
    args = [_i32(x, device) for x in (q_starts, q_lens, k_starts, k_lens)]
    out, lse = _run(q, k, v, *args, causal=causal, window=window)
    keys = [(k[b, s : s + n], v[b, s : s + n]) for b, (s, n) in enumerate(zip(k_starts, k_lens))]
    _check(out, lse, q, keys, args[0], args[1], causal=causal, window=window)


@pytest.mark.parametrize("page_size", [1, 16, 24, 32, 40, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offsets", ["int32", "int64"])
def test_paged(page_size, dtype, offsets, device, monkeypatch):
    # Chunked prefill / decode shapes over a paged cache: q_len <= k_len, causal, GQA 4:2. Pages of a multiple of the
    # key tile (16 in the interpreter, 32 or 64 on a GPU) hold whole tiles (one page id per tile); the others gather.
    if offsets == "int64":  # as in pools spanning 2^31 elements or more (test_bounds.py has a real one, on a GPU)
        monkeypatch.setattr(importlib.import_module("hf_flash.kernels.paged_kv"), "WIDE_POOL_ELEMENTS", 0)
    q_lens, k_lens = [11, 1, 30, 0], [40, 17, 30, 5]
    k_pool, v_pool, table, keys = scatter_to_pages(k_lens, 2, 64, page_size, dtype, device)
    q = torch.randn(len(q_lens), max(q_lens), 4, 64, device=device).to(dtype)
    zeros = _i32([0] * len(q_lens), device)
    junk = _i32([3] * len(q_lens), device)  # k_start is ignored with a block table
    q_len = _i32(q_lens, device)
    out, lse = _run(q, k_pool, v_pool, zeros, q_len, junk, _i32(k_lens, device), causal=True, block_table=table)
    _check(out, lse, q, keys, zeros, q_len, causal=True)


def test_paged_window_softcap(device):
    q_lens, k_lens, window = [25, 9], [61, 9], (13, -1)
    k_pool, v_pool, table, keys = scatter_to_pages(k_lens, 1, 80, 24, torch.float16, device)
    q = torch.randn(2, 25, 4, 80, device=device).to(torch.float16)
    zeros, q_len = _i32([0, 0], device), _i32(q_lens, device)
    out, lse = _run(q, k_pool, v_pool, zeros, q_len, zeros, _i32(k_lens, device), causal=True, window=window,
                    softcap=3.0, block_table=table)
    _check(out, lse, q, keys, zeros, q_len, causal=True, window=window, softcap=3.0)


def test_rows_that_see_nothing(device):
    _check_rows_that_see_nothing(device)


def test_an_empty_sequence_writes_nothing(device):
    _check_an_empty_sequence_writes_nothing(device)


def _check_an_empty_sequence_writes_nothing(device):
    """A sequence of no queries whose start lies among rows no sequence owns (NaN-poisoned): they stay untouched."""
    q, k, v = _dense(3, 30, 30, 2, 2, 64, torch.float16, device)
    args = [_i32(x, device) for x in ([21, 7, 18], [9, 0, 12], [0, 0, 0], [30, 30, 30])]
    out, lse = _run(q, k, v, *args, causal=True)
    _check(out, lse, q, [(k[b], v[b]) for b in range(3)], args[0], args[1], causal=True)


def _check_rows_that_see_nothing(device, window=True):
    """Causal with q_len > k_len, an empty key set, and (``window``) a window that leaves trailing rows without keys:
    those rows get out exactly 0 and lse -inf."""
    q, k, v = _dense(3, 40, 40, 2, 2, 64, torch.float16, device)
    zeros = _i32([0, 0, 0], device)
    q_len, k_len = _i32([40, 17, 40], device), _i32([10, 0, 40], device)
    out, lse = _run(q, k, v, zeros, q_len, zeros, k_len, causal=True)
    _check(out, lse, q, [(k[0, :10], v[0, :10]), (k[1, :0], v[1, :0]), (k[2], v[2])], zeros, q_len, causal=True)
    assert (out[0, :30] == 0).all() and (lse[0, :, :30] == float("-inf")).all()
    assert (out[1, :17] == 0).all() and (lse[1, :, :17] == float("-inf")).all()
    assert torch.isfinite(out[0, 30:]).all() and torch.isfinite(lse[0, :, 30:]).all()
    if not window:
        return
    # Non-causal window (2, 3) on q_len 40 > k_len 25: row i sees keys i - 17 .. i - 12, none for rows 0 .. 11.
    out, lse = _run(q, k, v, zeros, _i32([40] * 3, device), zeros, _i32([25] * 3, device), window=(2, 3))
    assert (out[:, :12] == 0).all() and (lse[:, :, :12] == float("-inf")).all()
    assert torch.isfinite(out[:, 12:]).all() and torch.isfinite(lse[:, :, 12:]).all()


@pytest.mark.parametrize("tile", [(16, 32), (16, 16), (64, 16)])
def test_other_tile_shapes(tile, monkeypatch, device):
    # The staged loop bounds for BLOCK_N > BLOCK_M, equal, and several key tiles per query tile.
    module = importlib.import_module("hf_flash.kernels.prefill")
    monkeypatch.setattr(module, "INTERPRET_CONFIG", (*tile, 4, 1))
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        monkeypatch.setitem(module.CONFIGS, (64, False, major), (*tile, 4, 2))
    q, k, v = _dense(2, 50, 67, 2, 1, 64, torch.float16, device)
    _run_dense(q, k, v, causal=True, window=(20, -1))
    k_pool, v_pool, table, keys = scatter_to_pages([67, 3], 1, 64, 24, torch.float16, device)
    zeros, q_len = _i32([0, 0], device), _i32([50, 3], device)
    out, lse = _run(q, k_pool, v_pool, zeros, q_len, zeros, _i32([67, 3], device), causal=True, block_table=table)
    _check(out, lse, q, keys, zeros, q_len, causal=True)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_large_bf16(head_dim, causal, device):
    # GPU tile configs (BLOCK_M 64..128) over many tiles, against fp64 and against SDPA in fp32.
    q, k, v = _dense(2, 1000, 1300, 8, 2, head_dim, torch.bfloat16, device)
    _run_dense(q, k, v, causal=causal)
    qf, kf, vf = q.float(), k.float(), v.float()
    out, _ = _run(qf, kf, vf, *[_i32(x, device) for x in ([0, 0], [1000] * 2, [0, 0], [1300] * 2)], causal=causal)
    mask = torch.ones(1000, 1300, dtype=torch.bool, device=device).tril(300) if causal else None
    ref = torch.nn.functional.scaled_dot_product_attention(
        qf.transpose(1, 2), kf.repeat_interleave(4, 2).transpose(1, 2), vf.repeat_interleave(4, 2).transpose(1, 2),
        attn_mask=mask).transpose(1, 2)
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.cuda
def test_large_paged_varlen(device):
    q_lens, k_lens = [700, 1, 257, 1024], [1500, 900, 257, 1024]
    k_pool, v_pool, table, keys = scatter_to_pages(k_lens, 2, 128, 64, torch.bfloat16, device)
    q = torch.randn(4, 1024, 16, 128, device=device).to(torch.bfloat16)
    zeros, q_len = _i32([0] * 4, device), _i32(q_lens, device)
    out, lse = _run(q, k_pool, v_pool, zeros, q_len, zeros, _i32(k_lens, device), causal=True, window=(511, -1),
                    block_table=table)
    _check(out, lse, q, keys, zeros, q_len, causal=True, window=(511, -1))

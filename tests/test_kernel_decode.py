"""The Triton paged-decode kernel against the float64 reference on K/V gathered back from the pages: ragged lengths,
shuffled pages of several sizes, GQA / MHA, padded head dims, window, softcap, split-KV (1, 3 and 8 splits agree).
Outputs are poisoned with NaN first, and unused page rows hold NaN, so skipped writes and stray reads show up."""
import math

import pytest
import torch
from hf_flash import kernels
from hf_flash.kernels import decode
from hf_flash.kernels.decode import MAX_SPLITS, MIN_SPLIT_KEYS, choose_num_splits, paged_decode, program_slots
from pages import scatter_to_pages
from reference import attention_ref

NAN = float("nan")

# |out - ref| <= atol + rtol * |ref|, ref in float64 on the same (rounded) inputs. fp32: ieee dots, so only fp32
# accumulation, exp2 and the split merge round (measured ~1e-6). fp16 / bf16: P is rounded to the input dtype before
# P @ V on the GPU and out is stored in it: about two half-ulps of the dtype (2^-11 fp16, 2^-8 bf16) relative, plus a
# floor for outputs near 0 (outputs are averages of unit-normal values, |out| < 1 mostly). Split partials are fp32, so
# splitting adds nothing visible. lse is accumulated in fp32 from exact products of the inputs, whatever their dtype.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.5e-2, 1.6e-2)}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5}


def _run(q, k_pool, v_pool, table, lens, num_splits, *, window_left=-1, softcap=0.0, out=None, lse=None):
    """Launch on NaN-poisoned outputs (fresh ones unless given); returns (out, lse)."""
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if lse is None else lse
    out.fill_(NAN)
    lse.fill_(NAN)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=q.device)
    paged_decode(q, k_pool, v_pool, table, seqlens, out, lse, softmax_scale=1.0 / math.sqrt(q.shape[-1]),
                 window_left=window_left, softcap=softcap, num_splits=num_splits)
    return out, lse


def _check(out, lse, q, keys, *, window_left=-1, softcap=0.0):
    """Each sequence's single query is its last key's position: bottom-right causal, window to the left."""
    atol, rtol = OUT_TOL[q.dtype]
    for b, (kb, vb) in enumerate(keys):
        ref_out, ref_lse = attention_ref(q[b][None], kb, vb, causal=True, window=(window_left, -1), softcap=softcap)
        torch.testing.assert_close(out[b].double(), ref_out[0], atol=atol, rtol=rtol)
        torch.testing.assert_close(lse[b].double(), ref_lse[:, 0], atol=LSE_TOL[q.dtype], rtol=0)  # -inf == -inf
        if kb.shape[0] == 0:
            assert (out[b] == 0).all() and (lse[b] == float("-inf")).all()


def _decode_all_splits(lens, hq, hkv, head_dim, page_size, dtype, device, **kw):
    k_pool, v_pool, table, keys = scatter_to_pages(lens, hkv, head_dim, page_size, dtype, device)
    q = torch.randn(len(lens), hq, head_dim, device=device).to(dtype)
    results = []
    for num_splits in (1, 3, 8):
        out, lse = _run(q, k_pool, v_pool, table, lens, num_splits, **kw)
        _check(out, lse, q, keys, **kw)
        results.append((out, lse))
    atol, rtol = OUT_TOL[dtype]
    for out, lse in results[1:]:  # split and unsplit agree with each other as well as with the reference
        torch.testing.assert_close(out, results[0][0], atol=atol, rtol=rtol)
        torch.testing.assert_close(lse, results[0][1], atol=LSE_TOL[dtype], rtol=0)


def _ragged(page_size):
    """Empty, one key, a page minus one, exactly a page, many pages (several 16-key tiles per split)."""
    return [0, 1, max(page_size - 1, 2), page_size, max(3 * page_size + 5, 70)]


@pytest.mark.parametrize("dtype, page_size, hq, hkv, head_dim", [
    (torch.float32, 16, 8, 1, 64),  # GQA 8:1
    (torch.float16, 24, 4, 2, 80),  # GQA 4:2, padded head dim, page size not a power of 2
    (torch.bfloat16, 1, 2, 2, 128),  # MHA, one key per page
    (torch.bfloat16, 64, 8, 1, 64),  # pages larger than the key tile
    (torch.bfloat16, 16, 4, 2, 128),
    (torch.float16, 16, 2, 1, 256),
])
def test_decode(dtype, page_size, hq, hkv, head_dim, device):
    _decode_all_splits(_ragged(page_size), hq, hkv, head_dim, page_size, dtype, device)


@pytest.mark.parametrize("window_left, dtype", [(0, torch.bfloat16), (5, torch.float32), (40, torch.bfloat16)])
def test_window(window_left, dtype, device):
    # 0: the query sees itself only; 5: less than a tile; 40: several tiles, more than some sequences hold.
    _decode_all_splits([0, 3, 30, 83], 4, 2, 64, 16, dtype, device, window_left=window_left)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(dtype, device):
    lens = [1, 50, 77]
    k_pool, v_pool, table, keys = scatter_to_pages(lens, 2, 64, 24, dtype, device)
    q = (torch.randn(3, 8, 64, device=device) * 3).to(dtype)  # logits ~N(0, 9): the cap bites
    for num_splits, window_left in ((1, -1), (3, -1), (3, 20)):
        out, lse = _run(q, k_pool, v_pool, table, lens, num_splits, window_left=window_left, softcap=2.0)
        _check(out, lse, q, keys, window_left=window_left, softcap=2.0)


def test_strided_and_empty_splits(device):
    # q / out / lse as the ops layer passes them (slices of [B, 1, H, D] and [B, H, 1]), K and V as halves of one
    # interleaved KV pool; more splits than tiles (empty splits write empty states) and an all-empty batch.
    lens, hq, hkv, head_dim, page_size, dtype = [5, 40, 0], 4, 2, 64, 16, torch.float16
    k_pool, v_pool, table, keys = scatter_to_pages(lens, hkv, head_dim, page_size, dtype, device)
    kv_pool = torch.stack((k_pool, v_pool), dim=2)  # [pages, page_size, 2, Hkv, D]
    q = torch.randn(3, 1, hq, head_dim, device=device).to(dtype)[:, 0]
    out = torch.empty(3, 1, hq, head_dim, dtype=dtype, device=device)[:, 0]
    lse = torch.empty(3, hq, 1, device=device)[:, :, 0]
    for num_splits in (1, 7):
        _run(q, kv_pool[:, :, 0], kv_pool[:, :, 1], table, lens, num_splits, out=out, lse=lse)
        _check(out, lse, q, keys)
    out, lse = _run(q, kv_pool[:, :, 0], kv_pool[:, :, 1], table, [0, 0, 0], 4)
    assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("head_dim", [64, 128])
def test_choose_num_splits(head_dim):
    slots = 4 * 132  # an H200 holding 4 programs per SM
    shortest = MIN_SPLIT_KEYS[head_dim]
    assert choose_num_splits(1, 8, shortest - 1, slots, head_dim) == 1  # short context: not worth a merge
    assert choose_num_splits(128, 8, 2048, slots, head_dim) == 1  # the batch fills the GPU already
    assert choose_num_splits(64, 8, 8192, slots, head_dim) == 1
    assert choose_num_splits(32, 8, 4096, slots, head_dim) == 2  # 256 pairs fill half the slots
    assert choose_num_splits(1, 8, 1024, slots, head_dim) == 1024 // shortest
    assert choose_num_splits(1, 1, 1 << 20, slots, head_dim) == MAX_SPLITS
    for batch in (1, 2, 8, 32, 64):
        for max_seqlen in (1, 255, 256, 1000, 4096, 16384, 65536):
            splits = choose_num_splits(batch, 8, max_seqlen, slots, head_dim)
            assert 1 <= splits <= MAX_SPLITS
            assert splits == 1 or max_seqlen // splits >= shortest  # every split streams its floor of keys
            assert splits == 1 or batch * 8 * splits <= slots  # the programs fit the GPU at once
    assert choose_num_splits(1, 8, 65536, 1, head_dim) == 1  # CPU: one slot
    assert choose_num_splits(0, 8, 4096, slots, head_dim) >= 1
    # Head dims share the row of their padded tile width.
    assert choose_num_splits(1, 8, 1024, slots, head_dim - 8) == choose_num_splits(1, 8, 1024, slots, head_dim)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_programs_per_sm_are_what_the_compiled_kernel_allows(head_dim, dtype, device):
    # CONFIGS' programs per SM, which the split count relies on, against the kernel as this GPU's compiler built it.
    device = torch.device(device)
    kernels.clear_compiled(decode._decode_kernel)  # only this config's kernels below
    lens = [300, 17]
    k_pool, v_pool, table, keys = scatter_to_pages(lens, 2, head_dim, 16, dtype, device)
    q = torch.randn(len(lens), 4, head_dim, device=device).to(dtype)
    for num_splits in (1, 3):  # both variants of the kernel
        _run(q, k_pool, v_pool, table, lens, num_splits)
    per_sm = decode._tile(head_dim, dtype, device)[-1]
    assert per_sm == decode.resident_programs(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    assert program_slots(head_dim, dtype, device) == sms * per_sm


@pytest.mark.cuda
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_large_bf16(page_size, device):
    # The GPU tile configs over long, ragged sequences; GQA 32/8, D 128 as in the benchmark; planned and fixed splits.
    lens = [3001, 1, 700, 4096]
    hq, hkv, head_dim, dtype = 32, 8, 128, torch.bfloat16
    k_pool, v_pool, table, keys = scatter_to_pages(lens, hkv, head_dim, page_size, dtype, device)
    q = torch.randn(len(lens), hq, head_dim, device=device).to(dtype)
    slots = program_slots(head_dim, dtype, torch.device(device))
    for num_splits in (1, choose_num_splits(len(lens), hkv, max(lens), slots, head_dim), MAX_SPLITS):
        out, lse = _run(q, k_pool, v_pool, table, lens, num_splits)
        _check(out, lse, q, keys)
        out, lse = _run(q, k_pool, v_pool, table, lens, num_splits, window_left=1000, softcap=30.0)
        _check(out, lse, q, keys, window_left=1000, softcap=30.0)

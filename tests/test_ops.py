"""hf_flash.ops, the public functional API: argument validation (a ValueError naming the argument, raised before any
kernel runs) and semantics against the float64 reference (tests/reference.py) on the torch path and on the Triton
kernels (Triton's interpreter on CPU, tiny shapes). Caches and pools hold NaN wherever no key is stored, so a read
past a sequence's keys or a stray write shows up."""
import contextlib
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from reference import attention_ref, visible

from hf_flash import ops, torch_backend

NAN, INF = float("nan"), float("inf")

# |out - ref| <= tol + tol * |ref|, ref in float64 from the same (rounded) inputs, so only the backends' own rounding
# counts. fp32: fp32 accumulation and exp only. fp16 / bf16: out is stored in the dtype (half an ulp: 2^-11 fp16, 2^-8
# bf16, relative) and the kernels round P to it before P @ V (another half ulp on each term of an average of unit
# normals); bf16's 8-bit mantissa is why it gets 7x fp16's tolerance. Measured max |err| / (1 + |ref|) on these
# shapes, torch path / kernels: fp32 4e-7 / 2e-7, fp16 2.4e-4 / 2.3e-4, bf16 1.7e-3 / 4.8e-3.
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# lse is accumulated in fp32 from exact products of the inputs whatever their dtype (measured 6e-7 on values ~1..5);
# the margin is for the GPU's approximate exp2 / log2.
LSE_TOL = 5e-5
DTYPES = list(OUT_TOL)
BACKENDS = ("torch", "triton")
KERNEL_MODULES = ("prefill", "decode", "merge", "paged_kv")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test body with every call forced through one backend; the Triton one needs the kernel modules. The
    torch path gets 4-row blocks, so these short sequences span several query and key blocks (skipped, masked and
    whole ones)."""
    if request.param == "triton":
        for name in KERNEL_MODULES:
            pytest.importorskip(f"hf_flash.kernels.{name}")
    else:
        monkeypatch.setattr(torch_backend, "BLOCK", 4)
    with ops.use_backend(request.param):
        yield request.param


def _randn(*shape, dtype=torch.float16, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def _i32(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _cu(lens, device):
    """cu_seqlens of ``lens``: int32 running offsets starting at 0."""
    return _i32([sum(lens[:b]) for b in range(len(lens) + 1)], device)


def _ops_options(causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """The reference's option names, spelled as hf_flash.ops takes them."""
    return {"causal": causal, "window_size": window, "softcap": softcap, "softmax_scale": scale}


def _ref(qs, ks, vs, **options):
    """Float64 reference over sequences ``(qs[i], ks[i], vs[i])``, their rows concatenated: out ``[rows, Hq, D]``,
    lse ``[rows, Hq]``."""
    refs = [attention_ref(q, k, v, **options) for q, k, v in zip(qs, ks, vs)]
    return torch.cat([out for out, _ in refs]), torch.cat([lse.T for _, lse in refs])


def _rows(out, lse):
    """Batched ``out [B, Sq, Hq, D]`` / ``lse [B, Hq, Sq]`` as rows: ``[B * Sq, Hq, D]`` / ``[B * Sq, Hq]``."""
    return out.flatten(0, 1), lse.transpose(1, 2).flatten(0, 1)


def _check(out, lse, ref_out, ref_lse):
    """``lse`` is in ``out``'s row layout (``[..., Hq]``). Values match the reference; no NaN anywhere; rows that see
    no key are exactly 0 with lse -inf."""
    assert out.isfinite().all(), "non-finite output"
    assert not lse.isnan().any() and not (lse == INF).any(), "NaN or +inf lse"
    tol = OUT_TOL[out.dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL, rtol=0)  # -inf must match -inf
    assert (out[ref_lse.isinf()] == 0).all(), "a row that sees no key is not 0"


# ------------------------------------------------------------------------------------------------ validation

B, S, HQ, HKV, D = 2, 5, 4, 2, 16


@pytest.fixture
def good(device):
    """Valid arguments of every entry point (fp16, on ``device``); each validation case breaks one thing."""

    def r(*shape):
        return _randn(*shape, device=device)

    return SimpleNamespace(
        i32=lambda values: _i32(values, device),
        q=r(B, S, HQ, D), k=r(B, S, HKV, D), v=r(B, S, HKV, D),
        qp=r(2 * S, HQ, D), kp=r(2 * S, HKV, D), vp=r(2 * S, HKV, D), cu=_i32([0, 3, 2 * S], device),
        pool=r(6, 4, HKV, D), table=_i32([[0, 1], [2, 3]], device), cu_paged=_i32([0, 5, 8], device),
        q1=r(B, 1, HQ, D), cache=r(B, 8, HKV, D), k1=r(B, 1, HKV, D), seqlens=_i32([2, 3], device),
        out=r(3, HQ, D), lse=torch.randn(3, HQ, device=device), slots=torch.tensor([5, -1, 0], device=device),
    )


def _valid(g):
    """Entry point name -> (function, valid keyword arguments)."""
    kvcache, merge = ops.attention_with_kvcache, ops.merge_state
    return {
        "attention": (ops.attention, {"q": g.q, "k": g.k, "v": g.v}),
        "varlen": (ops.attention_varlen, {"q": g.qp, "k": g.kp, "v": g.vp, "cu_seqlens_q": g.cu, "cu_seqlens_k": g.cu}),
        "paged_varlen": (ops.attention_varlen, {"q": g.qp, "k": g.pool, "v": g.pool.clone(), "cu_seqlens_q": g.cu,
                                                "cu_seqlens_k": g.cu_paged, "block_table": g.table}),
        "kvcache": (kvcache, {"q": g.q1, "k_cache": g.cache, "v_cache": g.cache.clone(), "cache_seqlens": g.seqlens,
                              "k": g.k1, "v": g.k1.clone()}),
        "paged_kvcache": (kvcache, {"q": g.q1, "k_cache": g.pool, "v_cache": g.pool.clone(), "cache_seqlens": g.seqlens,
                                    "block_table": g.table}),
        "packed_kvcache": (kvcache, {"q": g.qp, "k_cache": g.cache, "v_cache": g.cache.clone(),
                                     "cache_seqlens": g.seqlens, "cu_seqlens_q": g.cu}),
        "merge": (merge, {"out_a": g.out, "lse_a": g.lse, "out_b": g.out.clone(), "lse_b": g.lse.clone()}),
        "write_pages": (ops.write_kv_pages, {"k": g.kp[:3], "v": g.vp[:3], "k_pool": g.pool, "v_pool": g.pool.clone(),
                                             "slot_mapping": g.slots}),
    }


ENTRIES = ("attention", "varlen", "paged_varlen", "kvcache", "paged_kvcache", "packed_kvcache", "merge", "write_pages")


def _resized(t, dim, size):
    """A fresh random tensor like ``t`` with ``shape[dim] = size``."""
    shape = list(t.shape)
    shape[dim] = size
    return torch.randn(shape, device=t.device).to(t.dtype)


def _qkv(g, change):
    """q, k and v of ``attention`` all changed alike."""
    return {"q": change(g.q), "k": change(g.k), "v": change(g.v)}


def _strided_last_dim(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)  # same shape and values, last stride != 1


def _every_other(t):
    """``t``'s values in a view with last stride 2; the entries between hold 7777, which no offset, length, slot or
    page id of these tests is: a kernel reading the view as contiguous gets them."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), 7777, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _case(entry, change, match):
    return pytest.param(entry, change, match)


# (entry, overrides of the good arguments, regex the message must contain)
INVALID = {
    # dtypes, devices, ranks, shapes shared by every entry point
    "k-dtype": _case("attention", lambda g: {"k": g.k.float()}, "k has dtype torch.float32 but q"),
    "v-dtype": _case("attention", lambda g: {"v": g.v.bfloat16()}, "v has dtype torch.bfloat16 but q"),
    "k-device": _case("attention", lambda g: {"k": g.k.to("meta"), "v": g.v.to("meta")}, "k is on meta"),
    "v-device": _case("attention", lambda g: {"v": g.v.to("meta")}, "v is on meta"),
    "int-dtype": _case("attention", lambda g: _qkv(g, torch.Tensor.int), "q has dtype torch.int32"),
    "float64": _case("attention", lambda g: _qkv(g, torch.Tensor.double), "q has dtype torch.float64"),
    "head-dim-264": _case("attention", lambda g: _qkv(g, lambda t: _resized(t, -1, 264)), "q's head dim .*got 264"),
    "head-dim-20": _case("attention", lambda g: _qkv(g, lambda t: _resized(t, -1, 20)), "q's head dim .*got 20"),
    "head-dim-0": _case("attention", lambda g: _qkv(g, lambda t: _resized(t, -1, 0)), "q's head dim .*got 0"),
    "k-head-dim": _case("attention", lambda g: {"k": _resized(g.k, -1, 24), "v": _resized(g.v, -1, 24)},
                        "k's head dim 24"),
    "q-rank": _case("attention", lambda g: {"q": g.q[0]}, "q must have 4 dimensions"),
    "k-rank": _case("attention", lambda g: {"k": g.k[None], "v": g.v[None]}, "k must have 4 dimensions"),
    "v-rank": _case("attention", lambda g: {"v": g.v[0]}, "v must have 4 dimensions"),
    "q-not-tensor": _case("attention", lambda g: {"q": g.q.tolist()}, "q must be a torch.Tensor"),
    "gqa-groups": _case("attention", lambda g: {"q": _resized(g.q, 2, 3)}, "q's 3 heads .* k's 2 heads"),
    "q-no-heads": _case("attention", lambda g: {"q": _resized(g.q, 2, 0)}, "q has no heads"),
    "kv-no-heads": _case("attention", lambda g: {"k": _resized(g.k, 2, 0), "v": _resized(g.v, 2, 0)}, "k has no heads"),
    "cache-no-heads": _case("kvcache", lambda g: {"k_cache": _resized(g.cache, 2, 0), "k": None, "v": None,
                                                  "v_cache": _resized(g.cache, 2, 0)}, "k_cache has no heads"),
    "kv-shapes": _case("attention", lambda g: {"v": _resized(g.v, 1, S + 1)}, "k and v must have the same shape"),
    "kv-batch": _case("attention", lambda g: {"k": g.k[:1], "v": g.v[:1]}, "k has batch size 1 but q has 2"),
    # options
    "window-minus-2": _case("attention", lambda g: {"window_size": (-2, -1)}, "window_size"),
    "window-float": _case("attention", lambda g: {"window_size": (1.5, -1)}, "window_size"),
    "window-length-3": _case("attention", lambda g: {"window_size": (1, 2, 3)}, "window_size"),
    "window-length-1": _case("attention", lambda g: {"window_size": (4,)}, "window_size"),
    "window-int": _case("attention", lambda g: {"window_size": 4}, "window_size"),
    "window-bool": _case("attention", lambda g: {"window_size": (True, -1)}, "window_size"),
    "scale-bool": _case("attention", lambda g: {"softmax_scale": True}, "softmax_scale"),
    "causal-string": _case("attention", lambda g: {"causal": "no"}, "causal must be a bool"),
    "causal-tensor": _case("kvcache", lambda g: {"causal": torch.tensor(True)}, "causal must be a bool"),
    "softcap-negative": _case("attention", lambda g: {"softcap": -1.0}, "softcap"),
    "softcap-nan": _case("attention", lambda g: {"softcap": NAN}, "softcap"),
    "scale-zero": _case("attention", lambda g: {"softmax_scale": 0.0}, "softmax_scale"),
    "scale-negative": _case("attention", lambda g: {"softmax_scale": -0.5}, "softmax_scale"),
    "scale-inf": _case("attention", lambda g: {"softmax_scale": INF}, "softmax_scale"),
    "scale-nan": _case("attention", lambda g: {"softmax_scale": NAN}, "softmax_scale"),
    # finite in Python, inf in float32 (torch path off by 2.6, kernels NaN); finite in float32 but not times log2(e)
    "scale-fp32-inf": _case("attention", lambda g: {"softmax_scale": 1e39}, "softmax_scale must be .* at most 2.359e"),
    "scale-exp2-inf": _case("attention", lambda g: {"softmax_scale": 3e38}, "softmax_scale must be .* at most 2.359e"),
    "softcap-fp32-inf": _case("attention", lambda g: {"softcap": 1e39}, "softcap must be"),
    "softcap-tiny": _case("attention", lambda g: {"softcap": 1e-45}, "softcap must be .*softmax_scale / softcap"),
    # varlen offsets
    "cu-decreasing": _case("varlen", lambda g: {"cu_seqlens_q": g.i32([0, 11, 10])}, "cu_seqlens_q .*non-decreasing"),
    "cu-start": _case("varlen", lambda g: {"cu_seqlens_k": g.i32([1, 3, 10])}, "cu_seqlens_k must start at 0"),
    "cu-int64": _case("varlen", lambda g: {"cu_seqlens_q": g.cu.long()}, "cu_seqlens_q must be a 1-D int32"),
    "cu-2d": _case("varlen", lambda g: {"cu_seqlens_k": g.cu[None]}, "cu_seqlens_k must be a 1-D int32"),
    "cu-empty": _case("varlen", lambda g: {"cu_seqlens_q": g.cu[:0]}, "cu_seqlens_q must be a 1-D int32"),
    "cu-list": _case("varlen", lambda g: {"cu_seqlens_q": [0, 3, 10]}, "cu_seqlens_q must be a 1-D int32"),
    "cu-end": _case("varlen", lambda g: {"cu_seqlens_k": g.i32([0, 3, 11])}, "cu_seqlens_k ends at 11 .* only 10"),
    "cu-batch": _case("varlen", lambda g: {"cu_seqlens_k": g.i32([0, 3, 6, 10])}, "cu_seqlens_q describes 2 .* 3"),
    "cu-device": _case("varlen", lambda g: {"cu_seqlens_q": g.cu.to("meta")}, "cu_seqlens_q is on meta"),
    "varlen-q-rank": _case("varlen", lambda g: {"q": g.qp[None]}, "q must have 3 dimensions"),
    "varlen-k-rank": _case("varlen", lambda g: {"k": g.pool, "v": g.pool}, "k must have 3 dimensions"),
    "varlen-k-dtype": _case("varlen", lambda g: {"k": g.kp.float()}, "k has dtype"),
    # block tables
    "table-int64": _case("paged_varlen", lambda g: {"block_table": g.table.long()}, "block_table must be a 2-D int32"),
    "table-rank": _case("paged_varlen", lambda g: {"block_table": g.table[0]}, "block_table must be a 2-D int32"),
    "table-rows": _case("paged_varlen", lambda g: {"block_table": g.table[[0, 1, 1]]}, "block_table has 3 rows"),
    "table-device": _case("paged_varlen", lambda g: {"block_table": g.table.to("meta")}, "block_table is on meta"),
    "pool-rank": _case("paged_varlen", lambda g: {"k": g.kp, "v": g.vp}, "k must have 4 dimensions"),
    "pages-of-0": _case("paged_varlen", lambda g: {"k": _resized(g.pool, 1, 0), "v": _resized(g.pool, 1, 0)},
                        "k must hold at least one token per page"),
    "table-capacity": _case("paged_varlen", lambda g: {"cu_seqlens_k": g.i32([0, 9, 12])}, "block_table|cu_seqlens_k"),
    "kvcache-table-rows": _case("paged_kvcache", lambda g: {"block_table": g.table[:1]}, "block_table has 1 rows"),
    "kvcache-table-dtype": _case("paged_kvcache", lambda g: {"block_table": g.table.long()}, "block_table must be"),
    # page ids among the pages of 4 that hold each sequence's keys (paged_varlen: 5 and 3 keys; paged_kvcache: 2 and 3
    # cached): -1, the pool's size and far past it. Entries past the keys may hold anything: see
    # test_page_ids_past_the_keys_are_never_read.
    "table-id-negative": _case("paged_varlen", lambda g: {"block_table": g.i32([[0, -1], [2, 3]])},
                               r"block_table\[0, 1\] = -1 holds keys of sequence 0 but is not a page .*0 \.\. 5"),
    "table-id-num-pages": _case("paged_varlen", lambda g: {"block_table": g.i32([[0, 1], [6, -1]])},
                                r"block_table\[1, 0\] = 6 holds"),
    "table-id-1000": _case("paged_varlen", lambda g: {"block_table": g.i32([[1000, 1], [2, 3]])},
                           r"block_table\[0, 0\] = 1000 holds"),
    "kvcache-table-id-negative": _case("paged_kvcache", lambda g: {"block_table": g.i32([[-1, 1], [2, 3]])},
                                       r"block_table\[0, 0\] = -1 holds"),
    "kvcache-table-id-append": _case("paged_kvcache", lambda g: {  # 6: the page the appended token goes to
        "cache_seqlens": g.i32([4, 3]), "k": g.k1, "v": g.k1.clone(), "block_table": g.i32([[0, 6], [2, -1]])},
        r"block_table\[0, 1\] = 6 holds"),
    "packed-kvcache-table-id": _case("packed_kvcache", lambda g: {
        "k_cache": g.pool, "v_cache": g.pool.clone(), "cache_seqlens": g.i32([0, 0]), "k": g.kp, "v": g.vp,
        "block_table": g.i32([[0, -1], [2, 1000]])}, r"block_table\[1, 1\] = 1000 holds"),  # 7 appended keys
    # KV cache
    "seqlens-int64": _case("kvcache", lambda g: {"cache_seqlens": g.seqlens.long()}, "cache_seqlens must be"),
    "seqlens-shape": _case("kvcache", lambda g: {"cache_seqlens": g.i32([1, 2, 3])}, "cache_seqlens must be"),
    "seqlens-2d": _case("kvcache", lambda g: {"cache_seqlens": g.seqlens[None]}, "cache_seqlens must be"),
    "seqlens-float": _case("kvcache", lambda g: {"cache_seqlens": 2.0}, "cache_seqlens must be"),
    "seqlens-negative": _case("kvcache", lambda g: {"cache_seqlens": -1}, "cache_seqlens"),
    "seqlens-tensor-negative": _case("kvcache", lambda g: {"cache_seqlens": g.i32([-3, 4])},
                                     r"cache_seqlens must be >= 0, got \[-3, 4\]"),
    "paged-seqlens-negative": _case("paged_kvcache", lambda g: {"cache_seqlens": g.i32([2, -1])},
                                    "cache_seqlens must be >= 0"),
    "packed-seqlens-negative": _case("packed_kvcache", lambda g: {"cache_seqlens": g.i32([-1, 0])},
                                     "cache_seqlens must be >= 0"),
    "seqlens-device": _case("kvcache", lambda g: {"cache_seqlens": g.seqlens.to("meta")}, "cache_seqlens is on meta"),
    "num-splits-negative": _case("kvcache", lambda g: {"num_splits": -1}, "num_splits"),
    "num-splits-float": _case("kvcache", lambda g: {"num_splits": 1.5}, "num_splits"),
    "num-splits-bool": _case("kvcache", lambda g: {"num_splits": True}, "num_splits"),
    "num-splits-129": _case("kvcache", lambda g: {"num_splits": 129}, "num_splits must be an int from 0 to 128"),
    "seqlens-past-int32": _case("kvcache", lambda g: {"cache_seqlens": 2 ** 31}, "cache_seqlens must be from 0 to"),
    "cache-no-tokens": _case("kvcache", lambda g: {"k_cache": _resized(g.cache, 1, 0),
                                                   "v_cache": _resized(g.cache, 1, 0)},
                             "k_cache must hold at least one token per page"),
    "kvcache-pages-of-0": _case("paged_kvcache", lambda g: {"k_cache": _resized(g.pool, 1, 0),
                                                            "v_cache": _resized(g.pool, 1, 0)},
                                "k_cache must hold at least one token per page"),
    "k-without-v": _case("kvcache", lambda g: {"v": None}, "k and v must be given together"),
    "v-without-k": _case("kvcache", lambda g: {"k": None}, "k and v must be given together"),
    "new-k-seqlen": _case("kvcache", lambda g: {"k": _resized(g.k1, 1, 2), "v": _resized(g.k1, 1, 2)},
                          "k/v must be shaped like q"),
    "new-k-heads": _case("kvcache", lambda g: {"k": _resized(g.k1, 2, HQ), "v": _resized(g.k1, 2, HQ)},
                         "k/v must be shaped like q"),
    "new-v-shape": _case("kvcache", lambda g: {"v": _resized(g.k1, -1, 2 * D)}, "k/v must be shaped like q"),
    "new-k-rank": _case("kvcache", lambda g: {"k": g.k1[0], "v": g.k1[0]}, "k must have 4 dimensions"),
    "new-k-dtype": _case("kvcache", lambda g: {"k": g.k1.float(), "v": g.k1.float()}, "k/v are torch.float32"),
    "new-k-device": _case("kvcache", lambda g: {"k": g.k1.to("meta"), "v": g.k1.to("meta")}, "k/v are .* on meta"),
    "capacity": _case("kvcache", lambda g: {"cache_seqlens": 8}, "cache holds 8 tokens .* 9 are needed"),
    "capacity-paged": _case("paged_kvcache", lambda g: {"cache_seqlens": g.i32([2, 9])}, "cache holds 8 tokens"),
    "cache-batch": _case("kvcache", lambda g: {"k_cache": g.cache[:1], "v_cache": g.cache[:1]},
                         "k_cache has batch size 1"),
    "cache-strided": _case("kvcache", lambda g: {"k_cache": _strided_last_dim(g.cache)},
                           "k_cache must have a contiguous last dimension"),
    "cache-rank": _case("kvcache", lambda g: {"v_cache": g.cache[0]}, "v_cache must have 4 dimensions"),
    "cache-int": _case("kvcache", lambda g: {"k_cache": g.cache.int()}, "k_cache has dtype torch.int32"),
    "cache-dtype": _case("kvcache", lambda g: {"v_cache": g.cache.float()}, "v_cache"),
    "packed-q-rank": _case("packed_kvcache", lambda g: {"q": g.qp[None]}, "q must have 3 dimensions"),
    "packed-cu-end": _case("packed_kvcache", lambda g: {"cu_seqlens_q": g.i32([0, 3, 9])}, "cu_seqlens_q ends at 9"),
    # merge_state
    "merge-shape": _case("merge", lambda g: {"out_b": _resized(g.out, 0, 4)}, "out_a .* and out_b .* one shape"),
    "merge-dtype": _case("merge", lambda g: {"out_b": g.out.float()}, "out_a .* and out_b .* one shape and dtype"),
    "merge-lse-shape": _case("merge", lambda g: {"lse_a": g.lse[:2]}, "lse_a must have shape"),
    "merge-lse-transposed": _case("merge", lambda g: {"lse_b": g.lse.T.contiguous()}, "lse_b must have shape"),
    "merge-lse-dtype": _case("merge", lambda g: {"lse_a": g.lse.half()}, "lse_a has dtype torch.float16"),
    "merge-out-rank": _case("merge", lambda g: {"out_a": g.out[0]}, "out_a must have 3 dimensions"),
    "merge-out-int": _case("merge", lambda g: {"out_a": g.out.int(), "out_b": g.out.int()}, "out_a has dtype"),
    "merge-device": _case("merge", lambda g: {"lse_b": g.lse.to("meta")}, "lse_b is on meta"),
    # write_kv_pages
    "slots-int32": _case("write_pages", lambda g: {"slot_mapping": g.slots.int()}, "slot_mapping must be"),
    "slots-length": _case("write_pages", lambda g: {"slot_mapping": g.slots[:2]}, "slot_mapping must be"),
    "pool-dtype": _case("write_pages", lambda g: {"v_pool": g.pool.float()}, "v_pool is torch.float32"),
    "slots-past-end": _case("write_pages", lambda g: {"slot_mapping": torch.tensor([5, -1, 24], device=g.q.device)},
                            r"slot_mapping\[2\] = 24 is past the pools' 24 slots \(6 pages of 4\)"),
    "max-slot-past-end": _case("write_pages", lambda g: {"max_slot": 24}, r"max_slot = 24 is past the pools' 24 slots"),
    "max-slot-negative": _case("write_pages", lambda g: {"max_slot": -2}, r"max_slot must be an int >= 0"),
}


@pytest.fixture
def kernels_forbidden(monkeypatch):
    """No backend may be reached: validation has to reject the arguments before anything runs."""
    monkeypatch.setattr(ops, "_backend", mock.Mock(side_effect=AssertionError("a backend ran before validation")))


@pytest.mark.parametrize("entry, change, match", INVALID.values(), ids=list(INVALID))
def test_invalid_argument(entry, change, match, good, kernels_forbidden):
    fn, kwargs = _valid(good)[entry]
    with pytest.raises(ValueError, match=match):
        fn(**{**kwargs, **change(good)})


def test_numpy_scalars_are_taken_as_python_numbers(good):
    """flash-attn takes numpy's scalars for the scale, the soft-cap and the window (configs read from arrays)."""
    import numpy as np

    fn, kwargs = _valid(good)["attention"]
    python = {"softmax_scale": 0.25, "softcap": 5.0, "window_size": (2, 0), "causal": True}
    numpy_ = {"softmax_scale": np.float32(0.25), "softcap": np.float64(5.0),
              "window_size": (np.int64(2), np.int32(0)), "causal": np.bool_(True)}
    assert torch.equal(fn(**{**kwargs, **numpy_}), fn(**{**kwargs, **python}))


@pytest.mark.parametrize("entry", ENTRIES)
def test_valid_arguments_reach_the_backend(entry, good, monkeypatch):
    # The good arguments pass validation, so each invalid case fails for the one thing it breaks.
    backend = mock.Mock()
    backend.choose_num_splits.return_value = 1
    monkeypatch.setattr(ops, "_backend", mock.Mock(return_value=backend))
    fn, kwargs = _valid(good)[entry]
    fn(**kwargs)
    assert backend.method_calls


@contextlib.contextmanager
def _counted_host_reads():
    """Counts the reads of tensor values on the host in the block (each one a device sync on a GPU)."""
    reads = []

    def counted(name, read):
        def counted_read(self, *args, **kwargs):
            reads.append(name)
            return read(self, *args, **kwargs)
        return counted_read

    with contextlib.ExitStack() as stack:
        for name in ("tolist", "item", "__bool__", "__int__", "__index__", "__float__"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, counted(name, getattr(torch.Tensor, name))))
        yield reads


# case -> (entry, overrides of its good arguments, host reads allowed)
HOST_READS = {
    "attention": ("attention", {}, 0),
    "varlen": ("varlen", {}, 1),  # both offsets together
    "paged-varlen": ("paged_varlen", {}, 1),  # offsets and whether a page id in use is out of range
    "kvcache": ("kvcache", {}, 1),  # the lengths
    "kvcache-int-lengths": ("kvcache", {"cache_seqlens": 2}, 0),  # nothing to read
    "paged-kvcache": ("paged_kvcache", {}, 1),  # lengths and page ids
    "paged-kvcache-int-lengths": ("paged_kvcache", {"cache_seqlens": 2}, 1),  # page ids
    "paged-kvcache-max-seqlen-k": ("paged_kvcache", {"max_seqlen_k": 3}, 0),  # hf_flash's decode: the caller vouches
    "packed-kvcache": ("packed_kvcache", {}, 1),  # offsets and lengths
    "packed-kvcache-max-seqlen-k": ("packed_kvcache", {"max_seqlen_k": 10}, 1),  # offsets are read anyway
    "merge": ("merge", {}, 0),
    "write-pages": ("write_pages", {}, 1),  # whether a slot is past the pools
    "write-pages-max-slot": ("write_pages", {"max_slot": 23}, 0),  # hf_flash's cache: the bound is known on the host
}


@pytest.mark.parametrize("case", HOST_READS)
def test_host_reads_per_call(case, good, monkeypatch):
    # Checking device values costs one host sync per call at most: everything a call checks is read together.
    backend = mock.Mock()
    backend.choose_num_splits.return_value = 1
    monkeypatch.setattr(ops, "_backend", mock.Mock(return_value=backend))
    entry, change, allowed = HOST_READS[case]
    fn, kwargs = _valid(good)[entry]
    with _counted_host_reads() as reads:
        fn(**{**kwargs, **change})
    assert len(reads) == allowed, reads
    assert backend.method_calls


def test_use_backend(device):
    with pytest.raises(ValueError, match="backend must be 'triton' or 'torch', got 'cuda'"), ops.use_backend("cuda"):
        pass
    with ops.use_backend("torch"):
        assert ops._backend(torch.device(device)) is torch_backend
        with pytest.raises(ValueError, match="backend must be"), ops.use_backend(None):
            pass
        assert ops._backend(torch.device(device)) is torch_backend  # a refused name leaves the choice alone
    pytest.importorskip("hf_flash.kernels.prefill")
    with ops.use_backend("triton"):
        assert ops._backend(torch.device(device)) is not torch_backend
        with ops.use_backend("torch"):
            assert ops._backend(torch.device(device)) is torch_backend
        assert ops._backend(torch.device(device)) is not torch_backend  # nested blocks restore the outer choice


# ------------------------------------------------------------------------------------------------ attention

# (seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, options)
ATTENTION_CASES = {
    "full": (11, 11, 2, 2, 32, {}),
    "causal": (11, 11, 2, 2, 32, {"causal": True}),
    "causal-chunk-gqa": (5, 23, 4, 2, 32, {"causal": True}),  # q_len < k_len: bottom-right aligned
    "causal-blind-mqa": (9, 4, 4, 1, 32, {"causal": True}),  # q_len > k_len: the first 5 rows see no key
    "window": (13, 19, 4, 2, 32, {"window": (3, 2)}),
    "window-causal": (17, 17, 2, 1, 32, {"causal": True, "window": (4, -1)}),
    "softcap-scale": (12, 15, 2, 2, 32, {"softcap": 2.0, "scale": 0.5}),  # scores ~N(0, 2.8^2): the cap bites
    "head-dim-24": (7, 10, 2, 2, 24, {"causal": True}),  # not a power of 2: padded tiles
}


# Every case in fp16; the dtypes' tolerances on two of them.
ATTENTION_RUNS = [(case, torch.float16) for case in ATTENTION_CASES] + [
    (case, dtype) for case in ("causal-chunk-gqa", "softcap-scale") for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("case, dtype", ATTENTION_RUNS, ids=[f"{c}-{str(d)[6:]}" for c, d in ATTENTION_RUNS])
def test_attention(case, dtype, backend, device):
    seq_q, seq_k, hq, hkv, head_dim, options = ATTENTION_CASES[case]
    batch = 2
    q = _randn(batch, seq_q, hq, head_dim, dtype=dtype, device=device)
    k, v = (_randn(batch, seq_k, hkv, head_dim, dtype=dtype, device=device) for _ in range(2))
    out, lse = ops.attention(q, k, v, return_softmax_lse=True, **_ops_options(**options))
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (batch, hq, seq_q) and lse.dtype == torch.float32
    _check(*_rows(out, lse), *_ref(q, k, v, **options))


def test_attention_strided_inputs(backend, device):
    # q / k / v as views of one fused projection (any strides, unit last stride), and a q whose last dim is strided
    # (copied by ops): both give the reference's result.
    qkv = _randn(2, 9, 3, 4, 32, device=device)
    q, k, v = qkv.unbind(2)
    ref = _ref(q, k, v, causal=True)
    for query in (q, _strided_last_dim(q)):
        _check(*_rows(*ops.attention(query, k, v, causal=True, return_softmax_lse=True)), *ref)


def _packed(lens, heads, head_dim, dtype, device):
    """Random sequences of ``lens`` tokens: (packed ``[sum(lens), heads, head_dim]``, list of the sequences)."""
    packed = _randn(sum(lens), heads, head_dim, dtype=dtype, device=device)
    return packed, list(packed.split(lens))


VARLEN_OPTIONS = {
    "full": {},
    "causal": {"causal": True},
    "window-softcap": {"causal": True, "window": (3, -1), "softcap": 1.5},
}


@pytest.mark.parametrize("options", VARLEN_OPTIONS)
def test_attention_varlen(options, backend, device):
    # One empty sequence, one whose single query sees no key (k_len 0), q_len > k_len and q_len < k_len.
    q_lens, k_lens = [5, 0, 9, 1, 3], [5, 3, 12, 0, 7]
    options = VARLEN_OPTIONS[options]
    q, qs = _packed(q_lens, 4, 32, torch.bfloat16, device)
    k, ks = _packed(k_lens, 2, 32, torch.bfloat16, device)
    v, vs = _packed(k_lens, 2, 32, torch.bfloat16, device)
    out, lse = ops.attention_varlen(q, k, v, _cu(q_lens, device), _cu(k_lens, device), max(q_lens), max(k_lens),
                                    return_softmax_lse=True, **_ops_options(**options))
    assert out.shape == q.shape and lse.shape == (4, sum(q_lens))
    _check(out, lse.T, *_ref(qs, ks, vs, **options))


def test_attention_varlen_ignores_rows_past_the_offsets(backend, device, monkeypatch):
    # Static-shape callers (transformers' continuous batching under CUDA graphs) pad the packed tensors: rows past
    # the last offset belong to no sequence. Their keys are never read (NaN here) and their outputs are 0, finite.
    # Every tensor made with empty_like starts as NaN, so rows nothing writes cannot pass as zeros by chance.
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(NAN))
    q_lens, k_lens = [3, 6], [5, 7]
    q, qs = _packed(q_lens + [4], 4, 32, torch.bfloat16, device)
    k, ks = _packed(k_lens + [5], 2, 32, torch.bfloat16, device)
    v, vs = _packed(k_lens + [5], 2, 32, torch.bfloat16, device)
    k[sum(k_lens):], v[sum(k_lens):] = NAN, NAN
    out, lse = ops.attention_varlen(q, k, v, _cu(q_lens, device), _cu(k_lens, device), causal=True,
                                    return_softmax_lse=True)
    assert out.shape == q.shape
    _check(out[:sum(q_lens)], lse.T[:sum(q_lens)], *_ref(qs[:-1], ks[:-1], vs[:-1], causal=True))
    assert (out[sum(q_lens):] == 0).all()


def test_graph_capture_reads_nothing_on_the_host(monkeypatch):
    """transformers' continuous batching and hf_flash's decode steps are captured as CUDA graphs, where reading a device
    value on the host fails (and torch.compile, where a read breaks the graph): there the given max_seqlen_q/k reach
    the launchers, a missing max_seqlen_q is the packed length, and offsets, lengths, page ids and slots go unchecked
    (the caller vouches for them: page ids -1 and 7 of a 4-page pool pass); without the max_seqlen_k of a cache a
    ValueError says what to pass. (Capture itself is simulated here; the GPU test below captures for real.)"""
    q, _ = _packed([3, 5], 4, 32, torch.float16, "cpu")
    k, _ = _packed([4, 6], 2, 32, torch.float16, "cpu")
    cu_q, cu_k = _cu([3, 5], "cpu"), _cu([4, 6], "cpu")
    pool = torch.zeros(4, 4, 2, 32, dtype=torch.float16)
    table = _i32([[-1, 0, 0], [1, 7, 0]])  # the first page of sequence 0 and the second of sequence 1 are in use
    launched = []
    monkeypatch.setattr(ops, "_host_reads_forbidden", lambda device: True)
    monkeypatch.setattr(ops, "_run_prefill", lambda *args, **kwargs: launched.append(args) or (None, torch.zeros(1)))
    backend = mock.Mock()
    monkeypatch.setattr(ops, "_backend", mock.Mock(return_value=backend))
    with _counted_host_reads() as reads:
        ops.attention_varlen(q, k, k, cu_q, cu_k, 7, 9, causal=True)
        ops.attention_varlen(q, pool, pool, cu_q, cu_k, 7, 9, causal=True, block_table=table)
        ops.attention_varlen(q, k, k, cu_q, cu_k, causal=True)
        decode_q = q.view(2, 4, 4, 32)[:, :1]
        with pytest.raises(ValueError, match="max_seqlen_k must be given during CUDA-graph capture and torch.compile"):
            ops.attention_with_kvcache(decode_q, pool, pool, _i32([3, 5]), table)
        ops.attention_with_kvcache(decode_q, pool, pool, _i32([3, 6]), table, max_seqlen_k=6, num_splits=1)
        ops.write_kv_pages(k[:2], k[:2], pool, pool, torch.tensor([3, 99]))
    assert not reads
    # max_seqlen_q as given, then the packed length
    assert [args[7] for args in launched] == [7, 7, q.shape[0]]
    assert [name for name, _, _ in backend.method_calls] == ["paged_decode", "write_pages"]


@pytest.mark.cuda
def test_attention_varlen_replays_in_a_cuda_graph(device):
    """Captured once with room for sequences as long as the whole batch, replayed with other offsets written into the
    same tensors (as continuous batching does): each replay matches the reference for the offsets of that step."""
    hq, hkv, head_dim, total_q, total_k = 4, 2, 64, 24, 40
    q, k, v = (_randn(n, h, head_dim, dtype=torch.bfloat16, device=device)
               for n, h in ((total_q, hq), (total_k, hkv), (total_k, hkv)))
    cu_q, cu_k = _cu([10, 14], device), _cu([16, 24], device)
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(ops.attention_varlen(q, k, v, cu_q, cu_k, total_q, total_k, causal=True))
    for q_lens, k_lens in (([10, 14], [16, 24]), ([16, 8], [20, 20]), ([1, 23], [3, 37])):
        cu_q.copy_(_cu(q_lens, device))
        cu_k.copy_(_cu(k_lens, device))
        out.fill_(NAN)
        graph.replay()
        qs, ks, vs = q.split(q_lens), k.split(k_lens), v.split(k_lens)
        ref_out, _ = _ref(qs, ks, vs, causal=True)
        torch.testing.assert_close(out.double(), ref_out, atol=OUT_TOL[out.dtype], rtol=OUT_TOL[out.dtype])


def _page_table(lens, page_size, device, pad=0):
    """A block table over shuffled pages (torch.randperm) for sequences of ``lens`` keys, one spare column; unused
    entries hold ``pad``: by default page 0, which no sequence owns (NaN: slot 0 is where a gather of a hidden key
    lands), or an id of no page (vLLM pads with -1). Returns (table, number of pages)."""
    need = [math.ceil(n / page_size) for n in lens]
    num_pages = sum(need) + 1
    order = (torch.randperm(num_pages - 1) + 1).tolist()
    table = torch.full((len(lens), max(need) + 1), pad, dtype=torch.int32)
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    return table.to(device), num_pages


def _pool(seqs, table, num_pages, page_size):
    """Pages ``[num_pages, page_size, H, D]`` holding sequence b's tokens ``seqs[b]`` at logical positions 0.. of
    ``table[b]``'s pages; every other slot is NaN."""
    heads, head_dim = seqs[0].shape[1:]
    pool = torch.full((num_pages * page_size, heads, head_dim), NAN, device=seqs[0].device).to(seqs[0].dtype)
    for b, seq in enumerate(seqs):
        pos = torch.arange(len(seq), device=pool.device)
        pool[table[b].long()[pos // page_size] * page_size + pos % page_size] = seq
    return pool.view(num_pages, page_size, heads, head_dim)


@pytest.mark.parametrize("page_size, pad, strided", [(4, 0, False), (16, 0, False), (4, -1, False), (4, 0, True)])
def test_attention_varlen_paged(page_size, pad, strided, backend, device):
    # pad -1: block-table entries past a sequence's keys hold no page id, as vLLM pads them; they are never read.
    # strided: the offsets and the block table are views with last stride 2 (read as such, not as contiguous).
    q_lens, k_lens = [3, 2, 13, 4], [7, 0, 21, 4]
    options = {"causal": True, "window": (9, -1)}
    q, qs = _packed(q_lens, 4, 32, torch.float16, device)
    _, ks = _packed(k_lens, 2, 32, torch.float16, device)
    _, vs = _packed(k_lens, 2, 32, torch.float16, device)
    table, num_pages = _page_table(k_lens, page_size, device, pad)
    k_pool, v_pool = _pool(ks, table, num_pages, page_size), _pool(vs, table, num_pages, page_size)
    view = _every_other if strided else (lambda t: t)
    out, lse = ops.attention_varlen(q, k_pool, v_pool, view(_cu(q_lens, device)), view(_cu(k_lens, device)),
                                    block_table=view(table), return_softmax_lse=True, **_ops_options(**options))
    _check(out, lse.T, *_ref(qs, ks, vs, **options))


# ------------------------------------------------------------------------------------------------ KV cache


def _run_kvcache(q_lens, cache_lens, *, packed, paged, append, device, num_splits=0, pad=0, head_major=False,
                 strided=False, **options):
    """attention_with_kvcache over a NaN-backed cache (contiguous, or shuffled pages of 4, unused block-table entries
    ``pad``) holding ``cache_lens`` random keys, optionally appending ``q_lens`` new ones; checks out / lse against
    the reference and that the cache changed exactly at positions cache_seqlens.. of each sequence. ``head_major``:
    the cache is allocated ``[pages, H, page_size, D]`` and passed as its ``[pages, page_size, H, D]`` view.
    ``strided``: the lengths, offsets and block table are passed as views with last stride 2."""
    hq, hkv, head_dim, dtype = 4, 2, 32, torch.float16
    q, qs = _packed(q_lens, hq, head_dim, dtype, device)
    old_k, old_v = (_packed(cache_lens, hkv, head_dim, dtype, device)[1] for _ in range(2))
    new_k, new_ks = _packed(q_lens, hkv, head_dim, dtype, device)
    new_v, new_vs = _packed(q_lens, hkv, head_dim, dtype, device)
    keys = [torch.cat(kv) for kv in zip(old_k, new_ks)] if append else old_k
    values = [torch.cat(kv) for kv in zip(old_v, new_vs)] if append else old_v
    if paged:
        page_size = 4
        table, num_pages = _page_table([len(t) for t in keys], page_size, device, pad)
    else:  # a contiguous cache is one page per sequence, with spare room
        page_size, num_pages = max(len(t) for t in keys) + 3, len(q_lens)
        table = torch.arange(num_pages, dtype=torch.int32, device=device)[:, None]
    k_cache, v_cache = _pool(old_k, table, num_pages, page_size), _pool(old_v, table, num_pages, page_size)
    if head_major:
        k_cache, v_cache = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k_cache, v_cache))
    view = _every_other if strided else (lambda t: t)
    kw = {"cu_seqlens_q": view(_cu(q_lens, device))} if packed else {}
    if not packed:  # [B, Sq, H, D]
        q, new_k, new_v = (t.view(len(q_lens), q_lens[0], *t.shape[1:]) for t in (q, new_k, new_v))
    if append:
        kw.update(k=new_k, v=new_v)
    out, lse = ops.attention_with_kvcache(q, k_cache, v_cache, view(_i32(cache_lens, device)),
                                          view(table) if paged else None,
                                          num_splits=num_splits, return_softmax_lse=True, **kw,
                                          **_ops_options(**options))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == ((hq, sum(q_lens)) if packed else (len(q_lens), hq, q_lens[0]))
    nan_equal = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(k_cache, _pool(keys, table, num_pages, page_size), **nan_equal)
    torch.testing.assert_close(v_cache, _pool(values, table, num_pages, page_size), **nan_equal)
    _check(*((out, lse.T) if packed else _rows(out, lse)), *_ref(qs, keys, values, **options))


# num_splits 0 lets the backend choose; 3 splits leave the short sequences with empty splits.
DECODE_RUNS = {"auto-plain": (0, {}), "split3-window-softcap": (3, {"window": (6, -1), "softcap": 1.5})}


@pytest.mark.parametrize("run", DECODE_RUNS)
@pytest.mark.parametrize("append", [False, True], ids=["cached", "append"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_decode(paged, append, run, backend, device):
    # Single-token decode; without appending, the empty sequence's query sees no key.
    num_splits, options = DECODE_RUNS[run]
    _run_kvcache([1, 1, 1], [5, 0, 17], packed=False, paged=paged, append=append, num_splits=num_splits,
                 device=device, **options)


@pytest.mark.parametrize("append", [False, True], ids=["cached", "append"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_chunk(paged, append, backend, device):
    # Chunked prefill: 4 queries per sequence, causal bottom-right over cache + chunk (without appending, the 3-key
    # sequence's first query and all of the empty one's see no key).
    _run_kvcache([4, 4, 4], [3, 0, 9], packed=False, paged=paged, append=append, causal=True, device=device)


@pytest.mark.parametrize("append", [False, True], ids=["cached", "append"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_packed(paged, append, backend, device):
    # Packed q with cu_seqlens_q: ragged chunks (one empty), causal with a window.
    _run_kvcache([3, 0, 5, 1], [2, 4, 9, 0], packed=True, paged=paged, append=append, causal=True, window=(6, -1),
                 device=device)


@pytest.mark.parametrize("q_len", [1, 4], ids=["decode", "chunk"])
def test_kvcache_head_major_pages(q_len, backend, device):
    # Pools laid out head-major (FlashInfer's HND: each head's rows of a page contiguous) and passed as the NHD view
    # that the API takes: read, split and appended in place through their strides.
    _run_kvcache([q_len] * 3, [5, 0, 17], packed=False, paged=True, append=True, causal=True, num_splits=3,
                 head_major=True, device=device)


@pytest.mark.parametrize("q_len", [1, 4], ids=["decode", "chunk"])
def test_kvcache_strided_lengths_and_tables(q_len, backend, device):
    # cache_seqlens, cu_seqlens_q and the block table as views with last stride 2 (the kernels read such offsets,
    # lengths and page-id rows as contiguous runs, so the API hands them over with a unit stride).
    _run_kvcache([q_len] * 3, [5, 0, 17], packed=False, paged=True, append=True, causal=True, num_splits=3,
                 strided=True, device=device)
    _run_kvcache([q_len, 0, 2], [5, 3, 17], packed=True, paged=True, append=True, causal=True, strided=True,
                 device=device)


def test_windows_past_every_length_are_unbounded(backend, device):
    """A window side at least as long as the call's longest query or key run hides nothing: the output is the
    unbounded one's, bit for bit, even for sides past int64 (flash-attn likewise treats a side >= seqlen_k as -1)."""
    q, k, v = _randn(2, 6, 4, 32, device=device), _randn(2, 4, 2, 32, device=device), _randn(2, 4, 2, 32, device=device)
    cu = _cu([6, 6], device)
    calls = {
        "attention": lambda window: ops.attention(q, k, v, window_size=window),
        "varlen": lambda window: ops.attention_varlen(q.flatten(0, 1), k.repeat(1, 3, 1, 1).flatten(0, 1),
                                                      v.repeat(1, 3, 1, 1).flatten(0, 1), cu, cu, window_size=window),
        "decode": lambda window: ops.attention_with_kvcache(q[:, :1], k, v, 4, window_size=window, num_splits=2),
    }
    for name, call in calls.items():
        unbounded = call((-1, -1))
        for window in ((6, -1), (-1, 6), (2 ** 63 - 1, 2 ** 64), (2 ** 31, 7)):
            assert torch.equal(call(window), unbounded), (name, window)


@pytest.mark.parametrize("pad", [-1, 1000])
def test_page_ids_past_the_keys_are_never_read(pad, backend, device):
    # Block-table entries past a sequence's keys (after appending) may hold anything, as vLLM's -1 padding: decode
    # (split, an empty sequence with no page at all) and a chunk over such tables match the reference.
    _run_kvcache([1, 1, 1], [5, 0, 16], packed=False, paged=True, append=False, num_splits=3, device=device, pad=pad)
    _run_kvcache([4, 4, 4], [3, 0, 9], packed=False, paged=True, append=True, causal=True, device=device, pad=pad)


def _bits(t):
    """``t``'s bits, so that NaN compares equal to the same NaN and nothing else."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("bad", [-1, 6, 1000], ids=["minus-1", "num-pages", "1000"])
@pytest.mark.parametrize("q_len", [1, 3], ids=["decode", "chunk"])
def test_page_ids_out_of_range_write_nothing(q_len, bad, backend, device):
    """A page id out of range among the pages that hold a sequence's keys, appended ones included, is a ValueError
    raised before anything is written: the NaN-poisoned pools stay bit-identical, with no trace of the other
    sequence's valid append either. (The Triton interpreter crashed writing there; the torch path wrapped -1 to the
    last page, or wrote part of the batch before an IndexError.) write_kv_pages refuses a slot past the pools too."""
    num_pages, page_size = 6, 4
    k_pool, v_pool = (_randn(num_pages, page_size, 2, 32, device=device) for _ in range(2))
    k_pool[3:], v_pool[3:] = NAN, NAN  # the pages no sequence owns
    before = _bits(k_pool).clone(), _bits(v_pool).clone()
    q = _randn(2, q_len, 4, 32, device=device)
    k, v = (_randn(2, q_len, 2, 32, device=device) for _ in range(2))
    # Sequence 1 holds 4 keys, its appended ones go to its second page: the bad id.
    table = _i32([[0, 1, -1], [2, bad, -1]], device)
    match = rf"block_table\[1, 1\] = {bad} holds keys of sequence 1 but is not a page of the pool \(0 \.\. 5\)"
    with pytest.raises(ValueError, match=match):
        ops.attention_with_kvcache(q, k_pool, v_pool, _i32([2, 4], device), table, k=k, v=v)
    with pytest.raises(ValueError, match=match):
        ops.attention_with_kvcache(q.flatten(0, 1), k_pool, v_pool, _i32([2, 4], device), table, k=k.flatten(0, 1),
                                   v=v.flatten(0, 1), cu_seqlens_q=_cu([q_len, q_len], device))
    with pytest.raises(ValueError, match=match):  # reads only
        ops.attention_varlen(q.flatten(0, 1), k_pool, v_pool, _cu([q_len, q_len], device),
                             _cu([2 + q_len, 4 + q_len], device), block_table=table)
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 24 is past"):
        ops.write_kv_pages(k[:, 0], v[:, 0], k_pool, v_pool, torch.tensor([0, num_pages * page_size], device=device))
    assert torch.equal(_bits(k_pool), before[0]) and torch.equal(_bits(v_pool), before[1])


@pytest.mark.parametrize("entry", ["attention", "varlen", "kvcache"])
def test_without_lse(entry, backend, device):
    q = _randn(2, 1, 4, 32, device=device)
    k, v = _randn(2, 6, 2, 32, device=device), _randn(2, 6, 2, 32, device=device)
    cu = _cu([1, 1], device)
    call = {
        "attention": lambda **kw: ops.attention(q, k, v, causal=True, **kw),
        "varlen": lambda **kw: ops.attention_varlen(q[:, 0], k.flatten(0, 1), v.flatten(0, 1), cu, _cu([6, 6], device),
                                                    **kw),
        "kvcache": lambda **kw: ops.attention_with_kvcache(q, k, v, _i32([3, 6], device), **kw),
    }[entry]
    out = call()
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, call(return_softmax_lse=True)[0], rtol=0, atol=0)


def test_rows_that_see_no_key(backend, device):
    q, k, v = _randn(1, 6, 2, 32, device=device), _randn(1, 2, 2, 32, device=device), _randn(1, 2, 2, 32, device=device)
    out, lse = ops.attention(q, k, v, causal=True, return_softmax_lse=True)  # rows 0..3 precede every key
    assert (out[:, :4] == 0).all() and (lse[:, :, :4] == -INF).all() and lse[:, :, 4:].isfinite().all()
    out, lse = ops.attention_varlen(q[0], k[0], v[0], _cu([4, 2], device), _cu([0, 2], device),
                                    return_softmax_lse=True)
    assert (out[:4] == 0).all() and (lse[:, :4] == -INF).all() and lse[:, 4:].isfinite().all()
    cache = _randn(2, 4, 2, 32, device=device)
    out, lse = ops.attention_with_kvcache(q[0, :2, None], cache, cache, _i32([0, 2], device), num_splits=3,
                                          return_softmax_lse=True)  # the first sequence's cache is empty
    assert (out[0] == 0).all() and (lse[0] == -INF).all() and lse[1].isfinite().all()


def _assert_nan_exactly_at(out, lse, ref_out, ref_lse, rows):
    """``rows`` (bool ``[tokens, heads]``): those rows of ``out`` and ``lse`` are NaN throughout, every other one is
    finite and matches the reference."""
    assert torch.equal(out.isnan().all(-1), rows) and torch.equal(out.isnan().any(-1), rows)
    assert torch.equal(lse.isnan(), rows)
    tol = OUT_TOL[out.dtype]
    torch.testing.assert_close(out[~rows].double(), ref_out[~rows], atol=tol, rtol=tol)
    torch.testing.assert_close(lse[~rows].double(), ref_lse[~rows], atol=LSE_TOL, rtol=0)


def test_nan_reaches_the_rows_that_see_it(backend, device):
    """A NaN in one key makes NaN the rows (out and lse) of the queries that see it, in the query heads of its KV
    head, as in SDPA; rows the causal mask or the window hide it from, and other sequences, stay finite. A NaN query
    makes its own row NaN. (The torch path once gave such rows 0 and lse -inf, hiding the fault on CPU.)"""
    q_lens, k_lens, window = [6, 9, 4], [6, 14, 4], (5, -1)
    q, qs = _packed(q_lens, 4, 32, torch.float16, device)
    k, ks = _packed(k_lens, 2, 32, torch.float16, device)
    v, vs = _packed(k_lens, 2, 32, torch.float16, device)
    ks[1][7, 1, 3] = NAN  # sequence 1, key 7, KV head 1 (query heads 2 and 3); a view of k
    qs[2][1, 0, 0] = NAN  # sequence 2, query 1, head 0
    out, lse = ops.attention_varlen(q, k, v, _cu(q_lens, device), _cu(k_lens, device), causal=True,
                                    window_size=window, return_softmax_lse=True)
    rows = torch.zeros(sum(q_lens), 4, dtype=torch.bool, device=device)
    rows[6:15, 2:] = visible(9, 14, causal=True, window=window, device=device)[:, 7, None]
    rows[15 + 1, 0] = True
    assert rows[6:15, 2].any() and not rows[6:15, 2].all()  # the mask hides the key from some rows of its sequence
    _assert_nan_exactly_at(out, lse.T, *_ref(qs, ks, vs, causal=True, window=window), rows)


def test_nan_in_a_cached_key_reaches_only_its_query(backend, device):
    # Split decode over pages (the pool is NaN wherever no key is stored): the NaN key within the window makes its
    # sequence's query NaN through the split merge; outside the window it is not read.
    lens, window = [20, 20, 7], (8, -1)
    k_cache, v_cache = ([torch.randn(n, 2, 32, device=device).half() for n in lens] for _ in range(2))
    k_cache[0][15, 0, 0] = NAN  # in the window of sequence 0's query (keys 11..19), KV head 0: query heads 0 and 1
    k_cache[1][3, 0, 0] = NAN  # outside sequence 1's window
    table, num_pages = _page_table(lens, 4, device)
    k_pool, v_pool = _pool(k_cache, table, num_pages, 4), _pool(v_cache, table, num_pages, 4)
    q = _randn(3, 1, 4, 32, device=device)
    out, lse = ops.attention_with_kvcache(q, k_pool, v_pool, _i32(lens, device), table, window_size=window,
                                          num_splits=3, return_softmax_lse=True)
    rows = torch.zeros(3, 4, dtype=torch.bool, device=device)
    rows[0, :2] = True
    ref_out, ref_lse = _ref(list(q), k_cache, v_cache, causal=True, window=window)
    _assert_nan_exactly_at(out[:, 0], lse[:, :, 0], ref_out, ref_lse, rows)


def test_empty_batch(backend, device):
    # A batch of no sequences is no error (as in SDPA): empty outputs, and nothing written.
    q, k = _randn(0, 3, 4, 32, device=device), _randn(0, 5, 2, 32, device=device)
    out, lse = ops.attention(q, k, k, return_softmax_lse=True)
    assert out.shape == (0, 3, 4, 32) and lse.shape == (0, 4, 3)
    rows = _randn(2, 4, 32, device=device)  # packed rows past the last offset: no sequence's
    out, lse = ops.attention_varlen(rows, rows[:, :2], rows[:, :2], _i32([0], device), _i32([0], device),
                                    return_softmax_lse=True)
    assert (out == 0).all() and lse.shape == (4, 2)
    pool = _randn(3, 4, 2, 32, device=device)
    before = pool.clone()
    for table in (None, torch.zeros(0, 2, dtype=torch.int32, device=device)):
        cache = pool[:0] if table is None else pool
        out = ops.attention_with_kvcache(q[:, :1], cache, cache, _i32([], device), table, k=k[:, :1], v=k[:, :1])
        assert out.shape == (0, 1, 4, 32)
        packed_q, packed_k = q.flatten(0, 1), k.flatten(0, 1)  # no tokens
        out = ops.attention_with_kvcache(packed_q, cache, cache, 0, table, k=packed_k, v=packed_k,
                                         cu_seqlens_q=_i32([0], device))
        assert out.shape == (0, 4, 32)
    ops.write_kv_pages(packed_k, packed_k, pool, pool, torch.zeros(0, dtype=torch.int64, device=device))
    assert torch.equal(pool, before)
    no_lse = torch.empty(0, 4, device=device)
    out, lse = ops.merge_state(packed_q, no_lse, packed_q, no_lse)
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4)


def test_dense_batches_share_their_lengths_per_shape(backend, device):
    """attention() takes a padding-free batch's offsets and lengths from a per-shape cache: calls of one shape share
    them, in and out of inference mode, another shape gets its own, and every call gives the reference's output."""
    device = torch.empty(0, device=device).device  # as attention() passes it: q.device
    zeros, q_len, k_len = ops._dense_lengths(3, 5, 7, device)
    assert [t.tolist() for t in (zeros, q_len, k_len)] == [[0] * 3, [5] * 3, [7] * 3]
    assert all(t.dtype == torch.int32 and t.device == device for t in (zeros, q_len, k_len))
    with torch.inference_mode():
        again = ops._dense_lengths(3, 5, 7, device)
        made_here = ops._dense_lengths(2, 5, 11, device)  # first made in inference mode: still usable outside it
    assert all(a is b for a, b in zip(again, (zeros, q_len, k_len)))
    assert not any(t.is_inference() for t in made_here)
    assert ops._dense_lengths(3, 5, 6, device)[2].tolist() == [6] * 3
    for seqlen_k, mode in ((7, contextlib.nullcontext()), (7, torch.inference_mode()), (6, contextlib.nullcontext())):
        q, k, v = (_randn(3, s, 4, 32, device=device) for s in (5, seqlen_k, seqlen_k))
        with mode:
            out, lse = ops.attention(q, k, v, causal=True, return_softmax_lse=True)
        refs = [attention_ref(*seq, causal=True) for seq in zip(q, k, v)]
        _check(out, lse.transpose(1, 2), torch.stack([r[0] for r in refs]), torch.stack([r[1].T for r in refs]))


# ------------------------------------------------------------------------------------------------ merge_state and pages


def _merge_ref(out_a, lse_a, out_b, lse_b):
    """Float64 merge: weights exp(lse - lse_total); two empty states give 0 / -inf."""
    lse = torch.logaddexp(lse_a.double(), lse_b.double())
    safe = lse.nan_to_num(neginf=0.0)
    wa, wb = torch.exp(lse_a.double() - safe), torch.exp(lse_b.double() - safe)
    return wa[..., None] * out_a.double() + wb[..., None] * out_b.double(), lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_state(dtype, backend, device):
    out_a, out_b = (_randn(6, 2, 32, dtype=dtype, device=device) for _ in range(2))
    lse_a, lse_b = (3 * torch.randn(6, 2, device=device) for _ in range(2))
    lse_a[0] = -INF  # only b
    lse_b[1] = -INF  # only a
    lse_a[2, 0] = lse_b[2, 0] = -INF  # both empty: 0 / -inf, not NaN
    lse_a[3, 1], lse_b[3, 1] = 100.0, -100.0  # exp of the raw lse would overflow / underflow in fp32
    out, lse = ops.merge_state(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _check(out, lse, *_merge_ref(out_a, lse_a, out_b, lse_b))


def test_merge_state_nan(backend, device):
    # A NaN lse makes the merged row NaN (out and lse; it once gave 0); a NaN output of a state with weight makes its
    # elements NaN; the output of an empty state (lse -inf) is dropped, NaN or not.
    out_a, out_b = (_randn(4, 2, 32, dtype=torch.float32, device=device) for _ in range(2))
    lse_a, lse_b = (3 * torch.randn(4, 2, device=device) for _ in range(2))
    lse_b[2, 1] = -INF
    ref_out, ref_lse = _merge_ref(out_a, lse_a, out_b, lse_b)
    out_b[2, 1] = NAN  # the empty state's output
    lse_a[0, 0] = NAN
    lse_a[1, 1], lse_b[1, 1] = NAN, -INF
    out_a[3, 1, 5] = NAN
    out, lse = ops.merge_state(out_a, lse_a, out_b, lse_b)
    rows = torch.zeros(4, 2, dtype=torch.bool, device=device)
    rows[0, 0] = rows[1, 1] = True
    nan_out = rows[..., None].expand_as(out).clone()
    nan_out[3, 1, 5] = True
    assert torch.equal(out.isnan(), nan_out) and torch.equal(lse.isnan(), rows)
    torch.testing.assert_close(out[~nan_out].double(), ref_out[~nan_out], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[~rows].double(), ref_lse[~rows], atol=LSE_TOL, rtol=0)


@pytest.mark.parametrize("split", [0, 7])
def test_merge_split_attention(split, backend, device):
    # Attention over two disjoint key sets, merged, is attention over their union (split 0: one set is empty).
    q = _randn(1, 5, 4, 32, dtype=torch.float32, device=device)
    k, v = (_randn(1, 12, 2, 32, dtype=torch.float32, device=device) for _ in range(2))
    states = []
    for keys in (slice(0, split), slice(split, None)):
        out, lse = ops.attention(q, k[:, keys], v[:, keys], return_softmax_lse=True)
        states += [out[0], lse[0].T.contiguous()]  # [tokens, heads, head_dim], [tokens, heads]
    out, lse = ops.merge_state(*states)
    _check(out, lse, *_ref(q, k, v))


def test_outputs_from_inputs_that_require_grad_refuse_a_backward_pass(backend, device):
    """The kernels have no backward: with autograd recording, every entry point's outputs still lead back to its
    inputs, through a node that raises, so a backward pass fails loudly instead of stopping at the attention with no
    gradient. Under torch.no_grad nothing is recorded."""
    q, k, v = (_randn(1, 4, 2, 16, dtype=torch.float32, device=device).requires_grad_() for _ in range(3))
    cu = _cu([4], device)
    calls = {
        "attention": lambda: ops.attention(q, k, v, return_softmax_lse=True),
        "varlen": lambda: ops.attention_varlen(q[0], k[0], v[0], cu, cu, return_softmax_lse=True),
        "kvcache": lambda: ops.attention_with_kvcache(q[:, :1], k.detach(), v.detach(), 3, k=k[:, 1:2],
                                                      v=v[:, 1:2], return_softmax_lse=True),
        "merge": lambda: ops.merge_state(q[0], q[0, :, :, 0], k[0], k[0, :, :, 0]),
    }
    for name, call in calls.items():
        out, lse = call()
        assert out.requires_grad and lse.requires_grad, name
        with pytest.raises(NotImplementedError, match="no backward pass"):
            out.sum().backward()
        with torch.no_grad():
            assert not any(t.requires_grad for t in call()), name


def test_write_kv_pages(backend, device):
    k, v = _randn(5, 2, 32, device=device), _randn(5, 2, 32, device=device)
    k_pool, v_pool = _randn(4, 4, 2, 32, device=device), _randn(4, 4, 2, 32, device=device)
    slots = torch.tensor([7, -1, 0, 15, 3], device=device)  # -1: skipped
    k_pool_before, v_pool_before = k_pool.clone(), v_pool.clone()
    want_k, want_v = k_pool.clone().flatten(0, 1), v_pool.clone().flatten(0, 1)
    want_k[slots[slots >= 0]], want_v[slots[slots >= 0]] = k[slots >= 0], v[slots >= 0]
    for slot_mapping in (slots, _every_other(slots)):  # a strided view reads as its values, not as contiguous
        k_pool.copy_(k_pool_before)
        v_pool.copy_(v_pool_before)
        ops.write_kv_pages(k, v, k_pool, v_pool, slot_mapping)
        torch.testing.assert_close(k_pool.flatten(0, 1), want_k, rtol=0, atol=0)
        torch.testing.assert_close(v_pool.flatten(0, 1), want_v, rtol=0, atol=0)

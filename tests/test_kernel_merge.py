"""The Triton state-merge and page-write kernels: merge_state against a float64 computation (empty states included),
write_pages against direct indexing (skipped tokens, untouched slots). Outputs are poisoned with NaN first."""
import pytest
import torch
from hf_flash.kernels.merge import merge_state
from hf_flash.kernels.paged_kv import write_pages

NAN = float("nan")
INF = float("inf")

# Reference in float64 from the same (rounded) inputs. The kernel computes in fp32 and rounds the output once: fp32
# ~1e-6 relative; fp16 / bf16 one half-ulp of the stored output (2^-11, 2^-8) relative, plus a floor near 0.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def _merge_ref(out_a, lse_a, out_b, lse_b):
    lse_a, lse_b = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(lse_a, lse_b)  # -inf when both are
    w_a = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    w_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return w_a * out_a.double() + w_b * out_b.double(), lse


def _states(tokens, heads, head_dim, dtype, device):
    out_a = torch.randn(tokens, heads, head_dim, device=device).to(dtype)
    out_b = torch.randn(tokens, heads, head_dim, device=device).to(dtype)
    lse_a = torch.randn(tokens, heads, device=device) * 4
    lse_b = torch.randn(tokens, heads, device=device) * 4
    # Empty states (out 0, as the kernels write them): a only, b only, both; and far-apart magnitudes.
    lse_a[0], out_a[0] = -INF, 0.0
    lse_b[1], out_b[1] = -INF, 0.0
    lse_a[2], out_a[2], lse_b[2], out_b[2] = -INF, 0.0, -INF, 0.0
    lse_a[3, 0], lse_b[3, 0] = 80.0, -80.0
    lse_a[3, 1], lse_b[3, 1] = 300.0, 299.0  # exp(300) overflows fp32: the merge must work relative to the max
    return out_a, lse_a, out_b, lse_b


def _check_merge(out_a, lse_a, out_b, lse_b, out, lse):
    out.fill_(NAN)
    lse.fill_(NAN)
    merge_state(out_a, lse_a, out_b, lse_b, out, lse)
    ref_out, ref_lse = _merge_ref(out_a, lse_a, out_b, lse_b)
    atol, rtol = OUT_TOL[out.dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)  # -inf must match -inf
    assert (out[2] == 0).all() and (lse[2] == -INF).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, head_dim", [(4, 64), (3, 80), (40, 128)])
def test_merge_state(dtype, heads, head_dim, device):
    # 40 heads x 128 > one program's tile: several head blocks per token; 80: padded head dim.
    out_a, lse_a, out_b, lse_b = _states(7, heads, head_dim, dtype, device)
    _check_merge(out_a, lse_a, out_b, lse_b, torch.empty_like(out_a), torch.empty_like(lse_a))


def test_merge_state_strided(device):
    # Inputs and outputs as views with gaps (every stride but the last differs from the contiguous one).
    out_a, lse_a, out_b, lse_b = _states(6, 4, 64, torch.float16, device)
    wide = torch.empty(6, 2, 4, 64, dtype=torch.float16, device=device)
    wide[:, 1] = out_a
    lse_wide = torch.empty(4, 6, device=device)
    lse_wide.copy_(lse_b.T)
    out = torch.empty(6, 4, 2, 64, dtype=torch.float32, device=device)[:, :, 0]  # fp32 out from fp16 states
    lse = torch.empty(4, 6, device=device).T
    _check_merge(wide[:, 1], lse_a, out_b, lse_wide.T, out, lse)


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _pools(num_pages, page_size, hkv, head_dim, dtype, device):
    # Random data with NaN in the last page: untouched slots must compare bit-for-bit equal afterwards.
    k_pool = torch.randn(num_pages, page_size, hkv, head_dim, device=device).to(dtype)
    v_pool = torch.randn(num_pages, page_size, hkv, head_dim, device=device).to(dtype)
    k_pool[-1], v_pool[-1] = NAN, NAN
    return k_pool, v_pool


@pytest.mark.parametrize("page_size", [1, 16, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_pages(page_size, dtype, device):
    num_pages, hkv, head_dim, tokens = 12, 2, 80, 11
    k_pool, v_pool = _pools(num_pages, page_size, hkv, head_dim, dtype, device)
    # Distinct random slots (any page, any row), some skipped with -1.
    slots = torch.randperm(num_pages * page_size, device=device)[:tokens]
    slots[[2, 7]] = -1
    # k / v as slices of a fused projection [N, q + k + v heads, D]: strided, unit last stride.
    qkv = torch.randn(tokens, 3 * hkv, head_dim, device=device).to(dtype)
    k_new, v_new = qkv[:, hkv : 2 * hkv], qkv[:, 2 * hkv :]
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    keep = slots >= 0
    pages, rows = slots[keep] // page_size, slots[keep] % page_size
    k_ref[pages, rows], v_ref[pages, rows] = k_new[keep], v_new[keep]
    write_pages(k_new, v_new, k_pool, v_pool, slots)
    # Bitwise (NaN == NaN): written slots hold the new values exactly, all other slots are unchanged.
    assert torch.equal(_bits(k_pool), _bits(k_ref)) and torch.equal(_bits(v_pool), _bits(v_ref))


def test_write_pages_interleaved_pool(device):
    # K and V pools as halves of one [pages, page_size, 2, H, D] buffer; all tokens skipped, then none.
    kv = torch.randn(4, 16, 2, 3, 64, device=device).to(torch.float16)
    before = kv.clone()
    k_new = torch.randn(5, 3, 64, device=device).to(torch.float16)
    v_new = torch.randn(5, 3, 64, device=device).to(torch.float16)
    write_pages(k_new, v_new, kv[:, :, 0], kv[:, :, 1], torch.full((5,), -1, dtype=torch.int64, device=device))
    assert torch.equal(_bits(kv), _bits(before))
    slots = torch.tensor([63, 0, 17, 40, 5], dtype=torch.int64, device=device)
    write_pages(k_new, v_new, kv[:, :, 0], kv[:, :, 1], slots)
    before[slots // 16, slots % 16, 0], before[slots // 16, slots % 16, 1] = k_new, v_new
    assert torch.equal(_bits(kv), _bits(before))

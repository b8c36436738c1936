"""Guard tests: hf_flash's kernels touch no memory outside the page pools they are given. Each pool is a view into a
larger buffer whose guard pages before and after it hold NaN; block-table entries past each sequence's pages hold
garbage (-1, num_pages, a huge id), as vLLM-style tables may. The pages used sit at the pool's two ends (ids 0 and
num_pages - 1). A read outside the pool, or of a garbage entry, would bring NaN into the output; a write outside it
would change a guard. Run on both backends (the Triton kernels in the interpreter on CPU, on the GPU when there is
one; ``scripts/device_check.sh memcheck`` also runs them under compute-sanitizer's memcheck)."""
import pytest
import torch
from reference import attention_ref

from hf_flash import ops
from hf_flash.kernels import paged_kv

GUARD_PAGES, PAGE, HKV, HQ, D = 2, 4, 2, 4, 32
GARBAGE = (-1, 1 << 30)


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


def _guarded_pools(num_pages, dtype, device):
    """(k_pool, v_pool, k_buffer, v_buffer): pools ``[num_pages, PAGE, HKV, D]`` inside NaN-guarded buffers."""
    buffers = [torch.full((num_pages + 2 * GUARD_PAGES, PAGE, HKV, D), float("nan"), dtype=dtype, device=device)
               for _ in range(2)]
    return (*(b[GUARD_PAGES : GUARD_PAGES + num_pages] for b in buffers), *buffers)


def _guards_intact(buffer):
    return buffer[:GUARD_PAGES].isnan().all() and buffer[-GUARD_PAGES:].isnan().all()


def _table(page_lists, width, num_pages, device):
    """Block table whose entries past each sequence's pages hold garbage ids."""
    garbage = [*GARBAGE, num_pages]
    rows = [pages + [garbage[i % len(garbage)] for i in range(width - len(pages))] for pages in page_lists]
    return torch.tensor(rows, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_and_append_stay_inside_the_pools(dtype, backend, device):
    num_pages = 6
    k_pool, v_pool, k_buffer, v_buffer = _guarded_pools(num_pages, dtype, device)
    # Sequence 0 uses the pool's last and first pages, sequence 1 its second page; 7 and 2 tokens cached.
    pages = [[num_pages - 1, 0], [1]]
    lens = [7, 2]
    table = _table(pages, 5, num_pages, device)
    keys, values = [], []
    for b, (row, n) in enumerate(zip(pages, lens)):
        k, v = (torch.randn(n, HKV, D, device=device).to(dtype) for _ in range(2))
        for pos in range(n):
            k_pool[row[pos // PAGE], pos % PAGE], v_pool[row[pos // PAGE], pos % PAGE] = k[pos], v[pos]
        keys.append(k)
        values.append(v)
    q = torch.randn(2, 1, HQ, D, device=device).to(dtype)
    new_k, new_v = (torch.randn(2, 1, HKV, D, device=device).to(dtype) for _ in range(2))
    out = ops.attention_with_kvcache(q, k_pool, v_pool, torch.tensor(lens, dtype=torch.int32, device=device), table,
                                     k=new_k, v=new_v, causal=True, num_splits=3)
    assert _guards_intact(k_buffer) and _guards_intact(v_buffer)
    for b in range(2):
        ref, _ = attention_ref(q[b], torch.cat([keys[b], new_k[b]]), torch.cat([values[b], new_v[b]]), causal=True)
        torch.testing.assert_close(out[b].double(), ref, atol=2e-3, rtol=0)


def test_paged_prefill_and_page_writes_stay_inside_the_pools(backend, device):
    num_pages = 5
    k_pool, v_pool, k_buffer, v_buffer = _guarded_pools(num_pages, torch.float16, device)
    k_new, v_new = (torch.randn(6, HKV, D, device=device).half() for _ in range(2))
    # Slots at both ends of the pool: the first and last rows of pages 0 and num_pages - 1; -1: skipped (padding).
    slots = torch.tensor([0, 1, 2, 3, (num_pages - 1) * PAGE, -1], device=device)
    ops.write_kv_pages(k_new, v_new, k_pool, v_pool, slots)
    assert _guards_intact(k_buffer) and _guards_intact(v_buffer)
    assert torch.equal(k_pool[0], k_new[:4]) and torch.equal(v_pool[num_pages - 1, 0], v_new[4])
    q = torch.randn(3, HQ, D, device=device).half()
    table = _table([[0, num_pages - 1]], 3, num_pages, device)
    cu_q = torch.tensor([0, 3], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 5], dtype=torch.int32, device=device)
    out = ops.attention_varlen(q, k_pool, v_pool, cu_q, cu_k, block_table=table, causal=True)
    assert _guards_intact(k_buffer) and _guards_intact(v_buffer)
    ref, _ = attention_ref(q, k_new[:5], v_new[:5], causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=0)


@pytest.mark.cuda
def test_pools_spanning_past_2_31_elements(device):
    # Pools of 2^20 + 3 pages of 16 x 1 x 128 bf16 (2^31 + 6144 elements, 4.3 GB each) whose one sequence sits in the
    # last three pages: a key's offset from the pool's base passes 2^31, where 32-bit offsets would wrap.
    page, hkv, head_dim, dtype = 16, 1, 128, torch.bfloat16
    num_pages = (1 << 31) // (page * hkv * head_dim) + 3
    k_pool, v_pool = (torch.full((num_pages, page, hkv, head_dim), float("nan"), dtype=dtype, device=device)
                      for _ in range(2))
    assert paged_kv.wide_offsets(k_pool, v_pool)
    n = 40
    keys, values = (torch.randn(n, hkv, head_dim, device=device).to(dtype) for _ in range(2))
    pages = list(range(num_pages - 3, num_pages))
    for pos in range(n):
        k_pool[pages[pos // page], pos % page], v_pool[pages[pos // page], pos % page] = keys[pos], values[pos]
    table = torch.tensor([pages], dtype=torch.int32, device=device)
    q = torch.randn(n, 4, head_dim, device=device).to(dtype)
    with ops.use_backend("triton"):
        decoded = ops.attention_with_kvcache(q[-1:][None], k_pool, v_pool, torch.tensor([n], dtype=torch.int32,
                                             device=device), table, causal=True, num_splits=2)
        prefilled = ops.attention_varlen(q, k_pool, v_pool, torch.tensor([0, n], dtype=torch.int32, device=device),
                                         torch.tensor([0, n], dtype=torch.int32, device=device), block_table=table,
                                         causal=True)
    ref, _ = attention_ref(q, keys, values, causal=True)
    torch.testing.assert_close(prefilled.double(), ref, atol=2e-2, rtol=0)  # bf16: P and out rounded to 2^-8
    torch.testing.assert_close(decoded[0].double(), ref[-1:], atol=2e-2, rtol=0)

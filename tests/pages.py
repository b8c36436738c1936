"""Test inputs for paged K/V: random keys per sequence scattered over shuffled pages (torch.randperm)."""
import math

import torch


def scatter_to_pages(lens, hkv, head_dim, page_size, dtype, device):
    """Returns ``(k_pool, v_pool, block_table, keys)``, ``keys[b] = (k, v)`` of sequence ``b`` (``[n, hkv, D]``).

    Unused rows and a spare page, where the unused block-table entries point, hold NaN: reading anything past a
    sequence's keys breaks the result."""
    pages_per_seq = [math.ceil(n / page_size) for n in lens]
    num_pages = sum(pages_per_seq) + 1
    order = torch.randperm(num_pages).tolist()
    spare = order.pop()
    k_pool = torch.full((num_pages, page_size, hkv, head_dim), float("nan"), device=device).to(dtype)
    v_pool = k_pool.clone()
    table = torch.full((len(lens), max(pages_per_seq) + 1), spare, dtype=torch.int32)
    keys = []
    for b, n in enumerate(lens):
        kb = torch.randn(n, hkv, head_dim, device=device).to(dtype)
        vb = torch.randn(n, hkv, head_dim, device=device).to(dtype)
        for p in range(pages_per_seq[b]):
            table[b, p] = page = order.pop()
            rows = slice(p * page_size, min(n, (p + 1) * page_size))
            k_pool[page, : rows.stop - rows.start], v_pool[page, : rows.stop - rows.start] = kb[rows], vb[rows]
        keys.append((kb, vb))
    return k_pool, v_pool, table.to(device), keys

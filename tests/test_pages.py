"""hf_flash.pages.PageTable on its own: random walks of steps, forks and crops, each checked against the table's
invariants, every aborted step and every restore leaving the table exactly as it was."""
import random

import pytest

from hf_flash.pages import PageTable, PoolExhaustedError


def check_invariants(table):
    """Reference counts are the number of sequences holding each page plus its pins; the free list is exactly the
    unheld pages; every sequence has the pages its length needs and stores every position it saw but its padded
    ones."""
    counts = list(table.pinned)
    for pages, n, pads in zip(table.pages, table.lengths, table.pads, strict=True):
        assert len(pages) == table.pages_for(n)
        assert n + len(pads) == table.seen and pads == sorted(set(pads)) and all(0 <= p < table.seen for p in pads)
        for page in pages:
            counts[page] += 1
    assert table.refs == counts
    assert sorted(table.free) == [p for p, c in enumerate(counts) if c == 0]


def test_abort_restores_the_table_exactly():
    """Random steps (padding, forks, crops, copy-on-write), half of them aborted: each abort gives back exactly the
    table before the step, free-list order included, so later allocations do not depend on aborted ones."""
    rng = random.Random(random.getrandbits(32))
    table = PageTable(page_size=4, num_pages=64)
    for _ in range(300):
        if table.pages and rng.random() < 0.15:
            table.fork([rng.randrange(table.batch_size) for _ in range(rng.randint(1, 4))])
        elif table.pages and rng.random() < 0.1:
            table.crop(rng.randint(0, table.seen))
        q_len = rng.randint(1, 6)
        new_tokens = [rng.randint(0, q_len) for _ in range(table.batch_size or rng.randint(1, 4))]
        before = table.snapshot()
        try:
            step = table.begin_step(new_tokens, q_len)
        except PoolExhaustedError:
            assert table.snapshot() == before  # refused with nothing changed
            table.crop(0)
            continue
        check_invariants(table)
        assert all(table.refs[fresh] == 1 for _, _, fresh in step.copies)
        if rng.random() < 0.5:
            table.abort_step()
            assert table.snapshot() == before
        else:
            table.commit_step()
            assert table.lengths == [n + new for n, new in zip(before.lengths or [0] * len(new_tokens), new_tokens)]
        check_invariants(table)


def test_crop_keeps_the_tokens_below_the_cut():
    """Padding anywhere (left, inside a prompt, a finished sequence's step) is never stored: cropping to ``keep``
    positions leaves each sequence the tokens of its first ``keep`` positions that were not padding."""
    table = PageTable(page_size=4, num_pages=16)
    table.begin_step([8, 6, 5], 8, pads=[[], [0, 1], [2, 3, 6]])  # left padding and padding inside a prompt
    table.commit_step()
    table.begin_step([1, 0, 1], 1)  # the second sequence's step is padding
    table.commit_step()
    assert table.lengths == [9, 6, 6] and table.pads == [[], [0, 1, 8], [2, 3, 6]]
    for keep, lengths in ((9, [9, 6, 6]), (7, [7, 5, 4]), (4, [4, 2, 2]), (2, [2, 0, 2]), (0, [0, 0, 0])):
        snapshot = table.snapshot()
        table.crop(keep)
        assert table.lengths == lengths and table.seen == keep
        check_invariants(table)
        table.restore(snapshot)
    with pytest.raises(ValueError, match="pads"):
        table.begin_step([1, 1, 1], 2, pads=[[0], [1], []])
    check_invariants(table)


def test_copy_on_write_and_the_last_writer():
    table = PageTable(page_size=4, num_pages=8)
    table.begin_step([6], 6)
    table.commit_step()
    table.fork([0, 0, 0])  # three sequences share two pages, the second partly filled
    assert table.refs[table.pages[0][1]] == 3 and table.pages_needed([1, 1, 1]) == 2
    step = table.begin_step([1, 1, 1], 1)
    assert len(step.copies) == 2 and not step.appended  # the last writer keeps the shared page itself
    assert len({p[1] for p in table.pages}) == 3
    table.abort_step()
    assert table.pages == [table.pages[0]] * 3 and table.refs[table.pages[0][1]] == 3
    check_invariants(table)


def test_snapshot_survives_growth_and_restores():
    table = PageTable(page_size=2, num_pages=2)
    table.begin_step([3], 3)
    table.commit_step()
    snap = table.snapshot()
    table.fork([0, 0])
    table.add_pages(6)
    table.begin_step([4, 2], 4)
    table.commit_step()
    table.restore(snap)
    assert (table.pages, table.lengths, table.seen, table.num_pages) == ([snap.pages[0]], [3], 3, 8)
    check_invariants(table)
    with pytest.raises(RuntimeError, match="already open"):
        table.begin_step([1], 1)
        table.begin_step([1], 1)


def test_a_pinned_snapshots_pages_are_not_reused_until_unpinned():
    """A transaction's pin keeps the pages it saw: a fork that drops a sequence and the steps after it take other
    pages (so a restore finds the dropped sequence's tokens where they were); a pinned last page shared with no
    sequence is written in place, not copied; unpinning frees what no sequence holds any more."""
    table = PageTable(page_size=4, num_pages=16)
    table.begin_step([6, 5], 6, [[], [0]])
    table.commit_step()
    held = [list(p) for p in table.pages]
    pin = table.pin()
    check_invariants(table)
    step = table.begin_step([1, 1], 1)
    assert not step.copies  # pins are no sharers: nothing to copy on write
    table.commit_step()
    table.fork([0, 0])  # the second sequence dropped: its pages stay pinned
    for _ in range(6):
        table.begin_step([1, 1], 1)
        table.commit_step()
        assert not {p for pages in table.pages for p in pages[2:]} & set(held[1])
        check_invariants(table)
    table.unpin(pin)
    check_invariants(table)
    assert set(held[1]) <= set(table.free)
    pin = table.pin()
    table.fork([1, 1])
    table.restore(pin)
    assert table.pages == pin.pages and table.pinned == [0] * 16
    check_invariants(table)
    # A crop below the rows a pin holds, then a step: the step writes a copy of the page, never the pinned rows.
    pin = table.pin()
    table.crop(table.seen - 2)
    kept_page = table.pages[0][-1]
    assert table.lengths[0] % 4 and table.held[kept_page] > table.lengths[0] % 4  # the crop cut into a held page
    step = table.begin_step([1, 1], 1)
    assert (0, kept_page) == step.copies[0][:2] and table.pages[0][-1] != kept_page
    table.commit_step()
    table.restore(pin)
    assert table.pages == pin.pages and table.held == [0] * 16
    check_invariants(table)


def test_a_step_needing_more_than_the_free_pages_changes_nothing():
    table = PageTable(page_size=4, num_pages=3)
    before = table.snapshot()
    with pytest.raises(PoolExhaustedError, match="3 pages of 4 tokens.*needs 4 more for 13 new tokens"):
        table.begin_step([9, 4], 9)
    assert table.snapshot() == before and table.batch_size == 0
    with pytest.raises(ValueError, match="holds 1 sequences but the step has 2"):
        table.begin_step([1], 1)
        table.commit_step()
        table.begin_step([1, 1], 1)

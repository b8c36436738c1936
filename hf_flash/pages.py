"""``PageTable``: the host-side page bookkeeping of a ``PagedCache``, in plain Python (no tensors, no device).

A pool holds ``num_pages`` pages of ``page_size`` token slots; a page id names the same slot range in every layer's
pool. The table owns:

* the allocator: a free list and a reference count per page (pages are shared by forks, e.g. beam search);
* per sequence, its page ids in order (its row of the block table), how many tokens it stores, and which of its
  positions were padding (never stored): a sequence stores ``seen`` minus its padded positions;
* ``seen``: positions processed per sequence, padding included (what transformers calls the sequence length).

Every change goes through one of the transitions below, each of which either completes or raises with the table
untouched:

``begin_step(new_tokens, q_len, pads)`` -> ``StepChanges``
    Allocate pages for each sequence's new (non-padding) tokens, give a sequence a private copy of a shared, partly
    filled last page (copy on write: the caller copies the pages' contents), advance the lengths. The step is then
    open: ``commit_step()`` keeps it, ``abort_step()`` gives every page back and restores the lengths, leaving the
    table exactly as before ``begin_step``. Tokens are only ever written at or past a sequence's length, into pages it
    alone owns (or shares with nobody who reads that far), so an aborted step never damaged a stored token.
``fork(sources)``
    Sequence ``i`` becomes a copy of sequence ``sources[i]``, sharing its pages by reference.
``crop(keep)``
    Forget positions past ``keep``: each sequence keeps the tokens of its first ``keep`` positions that were not
    padding.
``snapshot()`` / ``restore(snapshot)``
    The whole table, for a transaction spanning many steps (``generate()`` on a caller's cache).
``pin()`` / ``unpin(snapshot)``
    A snapshot whose pages stay allocated until it is unpinned (or restored): pages the transaction's steps release
    (beams dropped by a fork, a crop) are not reused for new tokens, and a step writing into the rows of a page that
    the pin holds (after a crop below them) writes a copy, so ``restore`` finds their contents intact.
``add_pages(count)``
    The pools grew by ``count`` pages.
"""
import bisect
import dataclasses
import typing


class PoolExhaustedError(RuntimeError):
    """The page pool cannot hold the tokens asked for; nothing was written."""


class Snapshot(typing.NamedTuple):
    """The whole table at one moment (copies): what ``restore`` goes back to."""

    num_pages: int
    refs: list
    pinned: list
    held: list
    free: list
    pages: list
    lengths: list
    pads: list
    seen: int


@dataclasses.dataclass
class StepChanges:
    """What ``begin_step`` did, in the order it did it: enough to undo it and to tell the caller what to copy."""

    first: bool  # the step made the sequences (no sequence existed before it)
    q_len: int
    lengths_before: list
    pads_before: list | None  # how many padded positions each sequence had; None: the step pads nothing
    copies: list  # (sequence, shared page, private copy): the caller copies shared -> copy in every layer's pool
    appended: list  # (sequence, page) in allocation order


class PageTable:
    def __init__(self, page_size, num_pages):
        self.page_size = page_size
        self.num_pages = 0
        self.refs, self.free = [], []
        self.pinned = []  # per page, the pins among its references (no sequence reads or writes through those)
        self.held = []  # per page, how many of its leading rows a pin holds (0: none)
        self.pages, self.lengths = [], []
        self.pads = []  # per sequence, its padded positions in increasing order
        self.seen = 0
        self.open_step = None  # StepChanges of the step begun and neither committed nor aborted
        self.version = 0  # bumped whenever a sequence's page ids change (the block table must be rebuilt)
        self.add_pages(num_pages)

    # ------------------------------------------------------------------------------------------- queries

    def pages_for(self, tokens):
        return -(-tokens // self.page_size)

    @property
    def batch_size(self):
        return len(self.pages)

    def pages_needed(self, new_tokens):
        """Free pages ``begin_step(new_tokens)`` would take: growth, plus copies of shared, partly filled pages."""
        self._check_batch(new_tokens)
        if not self.pages:
            return sum(self.pages_for(n) for n in new_tokens)
        grow = sum(self.pages_for(n + new) - len(p) for n, new, p in zip(self.lengths, new_tokens, self.pages))
        writers, over_held = {}, set()
        for b, page in self._shared_partial_pages(new_tokens):
            writers[page] = writers.get(page, 0) + 1
            if self._over_held(b, page):
                over_held.add(page)
        # A shared page written by all of its sharers needs one copy fewer: the last writer keeps the page itself
        # (unless a pin holds the rows written: then every writer copies, at worst one page more than needed).
        return grow + sum(w if w < self._sharers(p) or p in over_held else w - 1 for p, w in writers.items())

    def slots(self, b, start, count):
        """Pool slots (``page * page_size + row``) of positions ``start .. start + count - 1`` of sequence ``b``."""
        pages, ps = self.pages[b], self.page_size
        return [pages[pos // ps] * ps + pos % ps for pos in range(start, start + count)]

    def snapshot(self):
        return Snapshot(self.num_pages, list(self.refs), list(self.pinned), list(self.held), list(self.free),
                        [list(p) for p in self.pages], list(self.lengths), [list(p) for p in self.pads], self.seen)

    # ----------------------------------------------------------------------------------------- transitions

    def add_pages(self, count):
        """Make ``count`` more page ids (the pools grew); new pages are taken first."""
        self.refs += [0] * count
        self.pinned += [0] * count
        self.held += [0] * count
        self.free = list(range(self.num_pages + count - 1, self.num_pages - 1, -1)) + self.free
        self.num_pages += count

    def begin_step(self, new_tokens, q_len, pads=None):
        """Open a step storing ``new_tokens[b]`` tokens for each sequence ``b`` (``q_len`` positions each, padding
        included; ``pads[b]``: the offsets in the step of sequence ``b``'s ``q_len - new_tokens[b]`` padded positions,
        by default the first ones: left padding). Raises ``PoolExhaustedError`` (nothing changed) when the free pages
        do not suffice."""
        if self.open_step is not None:
            raise RuntimeError("a step is already open: commit or abort it first")
        if pads is None and any(new != q_len for new in new_tokens):
            pads = [range(q_len - new) for new in new_tokens]
        elif pads is not None and [len(p) for p in pads] != [q_len - new for new in new_tokens]:
            raise ValueError(f"pads {pads} must hold q_len - new_tokens = {[q_len - n for n in new_tokens]} offsets")
        needed = self.pages_needed(new_tokens)
        if needed > len(self.free):
            raise PoolExhaustedError(
                f"PagedCache pool is full: {self.num_pages} pages of {self.page_size} tokens per layer, "
                f"{self.num_pages - len(self.free)} in use, {len(self.free)} free, but this step needs {needed} more "
                f"for {sum(new_tokens)} new tokens. Pass a larger num_pages/max_memory or grow=True.")
        first = not self.pages
        if first:
            self.pages, self.lengths = [[] for _ in new_tokens], [0] * len(new_tokens)
            self.pads = [[] for _ in new_tokens]
        step = StepChanges(first=first, q_len=q_len, lengths_before=list(self.lengths),
                           pads_before=None if pads is None else [len(p) for p in self.pads], copies=[], appended=[])
        for b, shared in self._shared_partial_pages(new_tokens):
            if self._sharers(shared) > 1 or self._over_held(b, shared):  # the last sharer keeps it, if no pin holds
                fresh = self._take()
                self.refs[shared] -= 1
                self.pages[b][-1] = fresh
                step.copies.append((b, shared, fresh))
        for b, new in enumerate(new_tokens):
            for _ in range(self.pages_for(self.lengths[b] + new) - len(self.pages[b])):
                page = self._take()
                self.pages[b].append(page)
                step.appended.append((b, page))
        self.lengths = [n + new for n, new in zip(self.lengths, new_tokens)]
        for b, offsets in enumerate(pads or ()):  # a decode step without padding does no per-sequence work here
            self.pads[b] += [self.seen + i for i in offsets]
        self.seen += q_len
        if step.copies or step.appended or first:
            self.version += 1
        self.open_step = step
        return step

    def commit_step(self):
        self.open_step = None

    def abort_step(self):
        """Undo the open step (in reverse order, so the free list is as it was too)."""
        step, self.open_step = self.open_step, None
        if step is None:
            return
        for b, page in reversed(step.appended):
            self.pages[b].pop()
            self._give_back(page)
        for b, shared, fresh in reversed(step.copies):
            self.pages[b][-1] = shared
            self.refs[shared] += 1
            self._give_back(fresh)
        self.lengths, self.seen = step.lengths_before, self.seen - step.q_len
        for p, count in zip(self.pads, step.pads_before or ()):
            del p[count:]
        if step.first:
            self.pages, self.lengths, self.pads = [], [], []
        self.version += 1

    def fork(self, sources):
        """Sequence ``i`` becomes a copy of sequence ``sources[i]`` (validated by the caller), sharing its pages."""
        pages = [list(self.pages[s]) for s in sources]
        lengths = [self.lengths[s] for s in sources]
        self.pads = [list(self.pads[s]) for s in sources]
        for p in pages:
            for page in p:
                self.refs[page] += 1
        for p in self.pages:
            self._release(p)
        self.pages, self.lengths = pages, lengths
        self.version += 1

    def crop(self, keep):
        """Keep the first ``keep`` positions (``0 <= keep <= seen``) of every sequence: the tokens of those that were
        not padding."""
        for b, pages in enumerate(self.pages):
            padded_below = bisect.bisect_left(self.pads[b], keep)
            del self.pads[b][padded_below:]
            self.lengths[b] = keep - padded_below
            kept = self.pages_for(self.lengths[b])
            self._release(pages[kept:])
            del pages[kept:]
        self.seen = keep
        self.version += 1

    def pin(self):
        """``snapshot()``, its pages held until ``unpin`` or ``restore`` of it."""
        snapshot = self.snapshot()
        for pages, length in zip(self.pages, self.lengths):
            for i, page in enumerate(pages):
                self.refs[page] += 1
                self.pinned[page] += 1
                self.held[page] = max(self.held[page], min(self.page_size, length - i * self.page_size))
        return snapshot

    def unpin(self, snapshot):
        """Let go of the pages ``pin()`` held (the transaction kept its changes)."""
        for pages in snapshot.pages:
            for page in pages:
                self.pinned[page] -= 1
                if not self.pinned[page]:
                    self.held[page] = 0
            self._release(pages)

    def restore(self, snapshot):
        """Back to ``snapshot()``'s state (a pin's included: its pins are gone); pages made since stay, free."""
        num_pages, refs, pinned, held, free, pages, lengths, pads, seen = snapshot
        self.refs = refs + [0] * (self.num_pages - num_pages)
        self.pinned = pinned + [0] * (self.num_pages - num_pages)
        self.held = held + [0] * (self.num_pages - num_pages)
        self.free = list(range(self.num_pages - 1, num_pages - 1, -1)) + free
        self.pages, self.lengths, self.seen, self.open_step = [list(p) for p in pages], list(lengths), seen, None
        self.pads = [list(p) for p in pads]
        self.version += 1

    # ------------------------------------------------------------------------------------------- helpers

    def _check_batch(self, new_tokens):
        if self.pages and len(new_tokens) != len(self.pages):
            raise ValueError(f"the cache holds {len(self.pages)} sequences but the step has {len(new_tokens)}")

    def _shared_partial_pages(self, new_tokens):
        """(sequence, last page) of the sequences that write into a last page they share with another sequence."""
        if not self.pages:
            return []
        return [(b, p[-1]) for b, (p, n, new) in enumerate(zip(self.pages, self.lengths, new_tokens))
                if new and n % self.page_size and (self._sharers(p[-1]) > 1 or self._over_held(b, p[-1]))]

    def _over_held(self, b, page):
        """Whether sequence ``b``'s next token goes into rows of ``page`` that a pin holds (after a crop below them)."""
        return self.lengths[b] % self.page_size < self.held[page]

    def _sharers(self, page):
        """The sequences holding ``page`` (its references less the pins)."""
        return self.refs[page] - self.pinned[page]

    def _take(self):
        page = self.free.pop()
        self.refs[page] = 1
        return page

    def _give_back(self, page):
        self.refs[page] = 0
        self.free.append(page)

    def _release(self, pages):
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.free.append(page)

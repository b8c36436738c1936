"""``PagedCache``: a transformers ``Cache`` that keeps K/V in fixed-size pages (vLLM / FlashInfer style).

Every layer owns one pool per K and V, ``[num_pages, page_size, H_kv, D]``, on that layer's device. All layers share
the bookkeeping: one page allocator (free list + reference counts: a page id names the same slot in every layer's
pool), a block table of page ids per sequence and the number of tokens each sequence holds.

The model calls ``update(k, v, layer_idx)`` and hands its return value to the attention function, which is the only
place that sees the attention mask. So ``update`` returns a ``PagedKV`` view of the new tokens, and the registered
``"hf_flash"`` attention function (``hf_flash.integration``) asks the cache to ``plan`` the step once (allocate pages,
drop left-padding tokens, build the slot mapping and lengths: host work, like FlashInfer's ``plan``), then writes the
layer's tokens into their pages and attends over them in place.
"""
import collections
import dataclasses
import math
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def _pinned(host_tensor, device):
    # A copy from pageable memory would wait for every kernel queued before it, and the host could no longer run
    # ahead of the GPU from one decode step to the next; from pinned memory it is queued like a kernel.
    return host_tensor.pin_memory() if device.type == "cuda" else host_tensor


def to_device(host_tensor, device):
    """Copy host bookkeeping to ``device`` without a sync."""
    return _pinned(host_tensor, device).to(device, non_blocking=True)


def copy_from_host(dst, host_tensor):
    """Copy host bookkeeping into the device tensor ``dst`` (or its leading block) without a sync."""
    dst[tuple(slice(0, n) for n in host_tensor.shape)].copy_(_pinned(host_tensor, dst.device), non_blocking=True)


class PoolExhaustedError(RuntimeError):
    """The page pool cannot hold the tokens asked for; nothing was written."""


@dataclasses.dataclass
class StepPlan:
    """What every layer of one forward step needs; device tensors are per device (multi-GPU models)."""

    q_len: int
    new_tokens: list  # valid (non-pad) new tokens per sequence
    slots: torch.Tensor  # int64 [B * q_len]: pool slot of each new token, -1 for left padding (never stored)
    seqlens: torch.Tensor  # int32 [B]: tokens per sequence after this step
    block_table: torch.Tensor  # int32 [B, max_pages]
    max_seqlen_k: int
    padded: bool  # some new token is padding: attention runs on the packed valid rows
    first: bool  # no sequence held a token before this step: the new states are all the keys
    rows: torch.Tensor | None  # int64 indices of the valid rows in the flattened [B * q_len] queries
    cu_seqlens_q: torch.Tensor | None  # int32 [B + 1] offsets of the packed valid rows
    num_splits: int = 0  # split-KV factor of the decode kernel; 0: chosen from the lengths
    _per_device: dict = dataclasses.field(default_factory=dict)

    DEVICE_FIELDS = ("slots", "seqlens", "block_table", "rows", "cu_seqlens_q")

    def on(self, device):
        """This plan's tensors on ``device`` (copied once per step and device, unless ``use`` gave them)."""
        if device not in self._per_device:
            self._per_device[device] = {f: None if getattr(self, f) is None else to_device(getattr(self, f), device)
                                        for f in self.DEVICE_FIELDS}
        return self._per_device[device]

    def use(self, device, tensors):
        """Serve ``tensors`` (a dict of ``DEVICE_FIELDS``, already holding this plan's values) on ``device``: a CUDA
        graph's static buffers."""
        self._per_device[device] = tensors


class PagedKV:
    """What ``PagedCache.update`` returns: the layer's new keys/values, still to be written by the attention
    function. Any attention implementation other than ``"hf_flash"`` cannot use it, and says so."""

    def __init__(self, cache, layer_idx, key, value):
        self.cache, self.layer_idx, self.key, self.value = cache, layer_idx, key, value

    def __getattr__(self, name):
        raise TypeError(f"a PagedCache works only with attn_implementation='hf_flash' (the attention function "
                        f"asked its keys for {name!r}); load the model with attn_implementation='hf_flash' or "
                        f"use a DynamicCache")


class PagedLayer(CacheLayerMixin):
    """One layer's K/V pools; the bookkeeping lives in the ``PagedCache`` that owns the layer."""

    is_sliding = False  # every token is kept; sliding windows are applied by the kernels

    def __init__(self, cache):
        super().__init__()
        self._cache = weakref.ref(cache)  # no reference cycle: the pools go as soon as the cache does

    @property
    def cache(self):
        return self._cache()

    def lazy_initialization(self, key_states, value_states):
        self.keys = key_states.new_zeros(self.cache.pool_shape(key_states))
        self.values = torch.zeros_like(self.keys)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("PagedLayer.update is not called directly: PagedCache.update handles the layer")

    def get_seq_length(self):
        return self.cache.get_seq_length()

    def get_mask_sizes(self, query_length):
        return self.cache.get_seq_length() + query_length, 0

    def get_max_length(self):
        return -1 if self.cache.grow else self.cache.num_pages * self.cache.page_size


class PagedCache(Cache):
    """K/V cache in pages, read in place by hf_flash's kernels (use with ``attn_implementation="hf_flash"``).

    Args:
        config: the model's config (its text config is used): number of layers, KV heads and head dim.
        page_size: tokens per page.
        num_pages: pages per layer pool. Default: from ``max_memory``, else 256 pages that grow on demand.
        max_memory: bytes for the K and V pools of all layers together (an alternative to ``num_pages``).
        dtype, device: of the pools; default to those of the first key states each layer sees.
        grow: when the pool is full, double it instead of raising ``PoolExhaustedError``. Defaults to ``True``
            only when neither ``num_pages`` nor ``max_memory`` is given.
        max_batch_size: optional bound on the number of sequences, checked at the first step.
        cuda_graphs: let ``generate()`` replay its single-token decode steps as CUDA graphs (``hf_flash.graphs``),
            captured once per batch size and split count; on CUDA only, and not with ``disable_compile=True``.

    Example:
        >>> cache = PagedCache(model.config, page_size=16, num_pages=1024)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        >>> cache.memory_stats()["tokens"]
    """

    is_compileable = False

    def __init__(self, config, *, page_size=16, num_pages=None, max_memory=None, dtype=None, device=None,
                 grow=None, max_batch_size=None, cuda_graphs=True):
        config = config.get_text_config(decoder=True)
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if num_pages is not None and max_memory is not None:
            raise ValueError("give num_pages or max_memory, not both")
        if num_pages is not None and (not isinstance(num_pages, int) or num_pages < 1):
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        if max_memory is not None and (not isinstance(max_memory, int) or max_memory < 1):
            raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.page_size, self.dtype, self.device = page_size, dtype, device
        # Private: transformers 5.17's ``Cache`` has a read-only ``max_batch_size`` property (deprecated alias).
        self._max_batch_size = max_batch_size
        self._max_memory = max_memory
        self.grow = (num_pages is None and max_memory is None) if grow is None else bool(grow)
        self.num_pages = num_pages if num_pages is not None else (None if max_memory is not None else 256)
        self.cuda_graphs = bool(cuda_graphs)
        self.graphs = {}  # hf_flash.graphs: captured decode steps over these pools, by (model, batch, splits, ...)
        super().__init__(layers=[PagedLayer(self) for _ in range(self.num_layers)])
        self.reset()

    # ------------------------------------------------------------------------------------------ bookkeeping

    def reset(self):
        """Forget every sequence; the pools are kept (and zeroed) for reuse."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys.zero_()
                layer.values.zero_()
        self._refs = [0] * (self.num_pages or 0)
        self._free = list(range((self.num_pages or 0) - 1, -1, -1))
        self._pages = []  # page ids per sequence
        self._lengths = []  # tokens stored per sequence (padding excluded)
        self._seen = 0  # positions processed per sequence, padding included: what transformers calls seq length
        self._plan = None
        self._plan_layers = set()  # layers that have attended with the current plan
        self._table_cache = None

    def pool_shape(self, key_states):
        if self.num_pages is None:  # sized from the memory budget once the element size is known
            itemsize = (self.dtype or key_states.dtype).itemsize
            per_page = 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * itemsize
            self.num_pages = max(1, self._max_memory // per_page)
            self._refs = [0] * self.num_pages
            self._free = list(range(self.num_pages - 1, -1, -1))
        return self.num_pages, self.page_size, self.num_kv_heads, self.head_dim

    def _pages_for(self, tokens):
        return math.ceil(tokens / self.page_size)

    def _release(self, pages):
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def _grow_pools(self, needed):
        new_total = max(2 * self.num_pages, self.num_pages + needed)
        for layer in self.layers:
            if layer.is_initialized:
                extra = new_total - self.num_pages
                layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((extra, *layer.keys.shape[1:]))])
                layer.values = torch.cat([layer.values, layer.values.new_zeros((extra, *layer.values.shape[1:]))])
        self.graphs.clear()  # they point into the old pools
        self._refs += [0] * (new_total - self.num_pages)
        self._free = list(range(new_total - 1, self.num_pages - 1, -1)) + self._free
        self.num_pages = new_total

    def _block_table(self):
        if self._table_cache is None:
            width = max([len(p) for p in self._pages] + [1])
            table = torch.zeros((len(self._pages), width), dtype=torch.int32)
            for b, pages in enumerate(self._pages):
                table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
            self._table_cache = table
        return self._table_cache

    # ---------------------------------------------------------------------------------------- the step

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by each attention layer with its new ``[B, H_kv, S, D]`` states; returns a ``PagedKV`` view
        (twice, for the model's ``key, value`` unpacking). The attention function stores and attends."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states.to(self.dtype or key_states.dtype), value_states)
            if self.device is not None:
                layer.keys, layer.values = layer.keys.to(self.device), layer.values.to(self.device)
        view = PagedKV(self, layer_idx, key_states, value_states)
        return view, view

    def plan(self, attention_mask, q_len, batch_size, layer_idx=None):
        """Plan a forward step once: allocate pages for the valid new tokens and build the slot mapping. Raises
        ``PoolExhaustedError`` before changing anything if the pool cannot hold them (unless ``grow``).

        Each layer's attention call passes its ``layer_idx`` and gets the current plan until it has used it once: a
        layer asking again starts the next step. Without ``layer_idx`` (a caller planning ahead of the forward, like
        the CUDA-graph runner) a new step is always planned, and every layer then uses it."""
        if self._plan is not None and layer_idx is not None and layer_idx not in self._plan_layers:
            self._plan_layers.add(layer_idx)
            return self._plan
        self._plan, self._plan_layers = None, set()
        valid = self._valid_new_tokens(attention_mask, q_len, batch_size)
        new_tokens = [q_len] * batch_size if valid is None else valid.sum(-1).tolist()
        first = not self._pages
        if first:
            if self._max_batch_size is not None and batch_size > self._max_batch_size:
                raise ValueError(f"batch of {batch_size} sequences exceeds max_batch_size={self._max_batch_size}")
            self._pages = [[] for _ in range(batch_size)]
            self._lengths = [0] * batch_size
            self._table_cache = None
        elif batch_size != len(self._pages):
            raise ValueError(f"the cache holds {len(self._pages)} sequences but the step has {batch_size}")

        # Pages to allocate: growth, plus a private copy of a shared, partly filled last page (copy on write).
        cow = [b for b in range(batch_size) if new_tokens[b] and self._lengths[b] % self.page_size
               and self._refs[self._pages[b][-1]] > 1]
        grow_by = [self._pages_for(self._lengths[b] + new_tokens[b]) - len(self._pages[b]) for b in range(batch_size)]
        # A shared page written by all of its sharers needs one copy fewer: the last writer keeps the page itself.
        writers = collections.Counter(self._pages[b][-1] for b in cow)
        needed = sum(grow_by) + sum(w if w < self._refs[p] else w - 1 for p, w in writers.items())
        if needed > len(self._free):
            if not self.grow:
                if first:  # the batch size is not committed either: a retry may use another one
                    self._pages, self._lengths = [], []
                raise PoolExhaustedError(
                    f"PagedCache pool is full: {self.num_pages} pages of {self.page_size} tokens per layer, "
                    f"{self.num_pages - len(self._free)} in use, {len(self._free)} free, but this step needs {needed} "
                    f"more for {sum(new_tokens)} new tokens. Pass a larger num_pages/max_memory or grow=True.")
            self._grow_pools(needed)

        # Commit: from here on nothing can fail.
        copies = []
        for b in cow:
            shared = self._pages[b][-1]
            if self._refs[shared] > 1:  # the last of the sharers keeps the page itself
                fresh = self._free.pop()
                self._refs[shared] -= 1
                self._refs[fresh] = 1
                self._pages[b][-1] = fresh
                copies.append((shared, fresh))
        if copies:
            self._copy_pages(*zip(*copies))
        for b, n in enumerate(grow_by):
            for _ in range(n):
                p = self._free.pop()
                self._refs[p] = 1
                self._pages[b].append(p)
        if copies or any(grow_by):
            self._table_cache = None
        before = list(self._lengths)
        ps = self.page_size
        if q_len == 1 and valid is None:  # decode: one slot per sequence, plain Python beats a dozen tensor ops
            slots = torch.tensor([self._pages[b][n // ps] * ps + n % ps for b, n in enumerate(before)])
        else:
            slots = torch.full((batch_size, q_len), -1, dtype=torch.int64)
            for b in range(batch_size):
                if new_tokens[b]:
                    pos = torch.arange(before[b], before[b] + new_tokens[b])
                    pages = torch.tensor(self._pages[b], dtype=torch.int64)
                    slots[b, slice(None) if valid is None else valid[b]] = pages[pos // ps] * ps + pos % ps
        self._lengths = [n + new for n, new in zip(before, new_tokens)]
        self._seen += q_len
        padded = any(n != q_len for n in new_tokens)
        rows = cu = None
        if padded:
            rows = torch.nonzero(slots.flatten() >= 0).flatten()
            cu = torch.zeros(batch_size + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(new_tokens, dtype=torch.int32), 0)
        self._plan = StepPlan(q_len=q_len, new_tokens=new_tokens, slots=slots.flatten(),
                              seqlens=torch.tensor(self._lengths, dtype=torch.int32),
                              block_table=self._block_table(), max_seqlen_k=max(self._lengths),
                              padded=padded, first=not any(before), rows=rows, cu_seqlens_q=cu)
        if layer_idx is not None:
            self._plan_layers.add(layer_idx)
        return self._plan

    def step_done(self):
        """The planned step ran without its layers asking for the plan (a CUDA-graph replay): the next attention call
        plans the next step instead of taking this one for its own."""
        self._plan, self._plan_layers = None, set()

    def _valid_new_tokens(self, attention_mask, q_len, batch_size):
        """Bool ``[B, q_len]`` on the host: which new tokens are not padding (from the 2-D mask's last ``q_len``
        columns), or None when all are. Padding is never stored; valid tokens keep their order."""
        if attention_mask is None:
            return None
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
                and attention_mask.shape[0] == batch_size):
            raise ValueError(f"PagedCache needs a 2-D [batch, length] padding mask (got {type(attention_mask).__name__} "
                             f"{tuple(getattr(attention_mask, 'shape', ()))}); use attn_implementation='hf_flash'")
        valid = attention_mask[:, -q_len:].bool().cpu()
        return None if bool(valid.all()) else valid

    def _copy_pages(self, src, dst):
        for layer in self.layers:
            if layer.is_initialized:
                s = to_device(torch.tensor(src), layer.keys.device)
                d = to_device(torch.tensor(dst), layer.keys.device)
                layer.keys[d] = layer.keys[s]
                layer.values[d] = layer.values[s]

    # ---------------------------------------------------------------- what generate() and friends call

    def get_seq_length(self, layer_idx=0):
        return self._seen

    def get_mask_sizes(self, query_length, layer_idx=0):
        # The 2-D mask covers every position, padding included; the kernels never read padding.
        return self._seen + query_length, 0

    def get_max_length(self, layer_idx=None):
        return self.layers[0].get_max_length()

    @property
    def batch_size(self):
        return len(self._pages)

    @property
    def is_croppable(self):
        return True

    def _replace_sequences(self, sources):
        """New sequence ``i`` shares all pages of old sequence ``sources[i]`` (reference counted)."""
        pages = [list(self._pages[s]) for s in sources]
        lengths = [self._lengths[s] for s in sources]
        for p in pages:
            for page in p:
                self._refs[page] += 1
        for p in self._pages:
            self._release(p)
        self._pages, self._lengths, self._table_cache = pages, lengths, None

    def reorder_cache(self, beam_idx):
        """Beam search: row ``i`` continues beam ``beam_idx[i]``; pages are shared, not copied."""
        self._replace_sequences([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats):
        self._replace_sequences([b for b in range(len(self._pages)) for _ in range(repeats)])

    def batch_select_indices(self, indices):
        self._replace_sequences([int(i) for i in torch.as_tensor(indices).tolist()])

    def crop(self, max_length):
        """Drop the newest positions: ``crop(-n)`` removes ``n``; ``crop(n > 0)`` keeps the first ``n``."""
        keep = self._seen + max_length if max_length < 0 else min(max_length, self._seen)
        if max_length == 0 or keep >= self._seen:
            return
        keep = max(keep, 0)
        removed = self._seen - keep
        for b in range(len(self._pages)):
            self._lengths[b] = max(self._lengths[b] - removed, 0)
            extra = self._pages[b][self._pages_for(self._lengths[b]) :]
            del self._pages[b][self._pages_for(self._lengths[b]) :]
            self._release(extra)
        self._seen = keep
        self._plan, self._table_cache = None, None

    def memory_stats(self):
        """Pages used and free, bytes allocated to the pools and the bytes the held tokens need, tokens held."""
        bytes_per_page = sum(2 * layer.keys[0].numel() * layer.keys.element_size()
                             for layer in self.layers if layer.is_initialized)
        used = (self.num_pages or 0) - len(self._free)
        tokens = sum(self._lengths)
        return {"page_size": self.page_size, "pages_total": self.num_pages or 0, "pages_used": used,
                "pages_free": len(self._free), "tokens": tokens, "bytes_allocated": (self.num_pages or 0) * bytes_per_page,
                "bytes_used": used * bytes_per_page, "bytes_per_token": bytes_per_page // self.page_size}

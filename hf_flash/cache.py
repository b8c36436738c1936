"""``PagedCache``: a transformers ``Cache`` that keeps K/V in fixed-size pages (vLLM / FlashInfer style).

Every layer owns one pool per K and V, ``[num_pages, page_size, H_kv, D]``, on that layer's device (a model split over
devices with ``device_map`` keeps each layer's pages beside its weights), with ``H_kv`` the KV heads that layer's
attention computes in this process: the model's, or this rank's share of them under tensor parallelism. All layers share
the bookkeeping, a ``hf_flash.pages.PageTable`` (allocator, reference counts, each sequence's page ids and lengths):
a page id names the same slots in every layer's pool.

The model calls ``update(k, v, layer_idx)`` and hands its return value to the attention function, which is the only
place that sees the attention mask. So ``update`` returns a ``PagedKV`` view of the new tokens, and the registered
``"hf_flash"`` attention function (``hf_flash.integration``) asks the cache for the step's plan (``layer_plan``: the
first layer plans it: pages, dropped left padding, slot mapping and lengths), writes the layer's tokens into their
pages, attends over them in place and reports the layer done (``layer_done``).
"""
import contextlib
import copy
import dataclasses
import operator
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .internals import warn_once
from .pages import PageTable


def _pinned(host_tensor, device):
    # A copy from pageable memory would wait for every kernel queued before it, and the host could no longer run
    # ahead of the GPU from one decode step to the next; from pinned memory it is queued like a kernel.
    return host_tensor.pin_memory() if device.type == "cuda" else host_tensor


def normal_tensors():
    """Tensors made in here are ordinary even under ``torch.inference_mode()``: pools and a graph's static buffers
    made there would be inference tensors, which no later step outside it may write (a caller's next turn, the next
    generate() call taking over kept pools and the graphs over them)."""
    return torch.inference_mode(False)


def _int_or_none(value):
    """``value`` as an int if it is one (numpy's and 0-d tensors' too, as DynamicCache takes them), not a bool."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def to_device(host_tensor, device):
    """Copy host bookkeeping to ``device`` without a sync."""
    return _pinned(host_tensor, device).to(device, non_blocking=True)


def copy_from_host(dst, host_tensor):
    """Copy host bookkeeping into the device tensor ``dst`` (or its leading block) without a sync."""
    dst[tuple(slice(0, n) for n in host_tensor.shape)].copy_(_pinned(host_tensor, dst.device), non_blocking=True)


@dataclasses.dataclass
class StepPlan:
    """What every layer of one forward step needs; device tensors are per device (multi-GPU models)."""

    q_len: int
    new_tokens: list  # valid (non-pad) new tokens per sequence
    slots: torch.Tensor  # int64 [B * q_len]: pool slot of each new token, -1 for left padding (never stored)
    max_slot: int  # the largest of ``slots``: the pools' bound is checked on the host, not by reading the device
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
    supports_early_init = False  # the pools' heads are those of the first key states (a tensor-parallel share)

    def __init__(self, cache):
        super().__init__()
        self._cache = weakref.ref(cache)  # no reference cycle: the pools go as soon as the cache does

    @property
    def cache(self):
        return self._cache()

    def __getstate__(self):  # copies and pickles: the owning cache's __setstate__ binds the layer to the new cache
        return {name: value for name, value in self.__dict__.items() if name != "_cache"}

    def lazy_initialization(self, key_states, value_states):
        # On the key states' device: under device_map each layer's pages stay beside its weights.
        with normal_tensors():
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
        page_size: tokens per page. Prefill over the cache (chunked prefill, a chat's next turn) reads pages that
            hold whole key tiles (a multiple of 64 tokens at 16-bit head dims up to 128) faster than smaller ones (see
            BENCHMARKS.md); small pages waste less of each sequence's last page.
        num_pages: pages per layer pool. Default: from ``max_memory``, else 256 pages that grow on demand.
        max_memory: bytes for the K and V pools of all layers together, in this process (an alternative to
            ``num_pages``): under tensor parallelism each rank's cache holds its own heads within its own budget.
        dtype, device: of the pools; default to those of the first key states each layer sees. Leave ``device``
            unset for a model whose layers are on several devices (``device_map``).
        grow: when the pool is full, double it instead of raising ``PoolExhaustedError``. Defaults to ``True``
            only when neither ``num_pages`` nor ``max_memory`` is given.
        max_batch_size: optional bound on the number of sequences, checked at the first step.
        cuda_graphs: let ``generate()`` replay its single-token decode steps as CUDA graphs (``hf_flash.graphs``),
            captured once per batch size and split count; on CUDA only, and not with ``disable_compile=True``.

    The pools hold the KV heads the model's attention actually computes in this process (``num_kv_heads``, known from
    the first key states): all of the config's, or under tensor parallelism (``tp_plan="auto"``) this rank's share.

    A forward over the cache is one step (``hf_flash.pages``): the first layer to attend plans it (pages, slots,
    lengths: host work, like FlashInfer's ``plan``), every layer stores its tokens and attends, and the step commits
    when the last layer has. A step that raises before that (an exception, an interrupt, out of memory, a model the
    cache does not fit) is aborted, so the cache holds exactly what it held before: at once when hf_flash's attention
    raises, else as soon as the cache is used again. What a plain forward raises after its last attention (in the
    last MLP, the final norm, the output head) leaves the step stored, as transformers' own caches keep what their
    layers stored. The reads transformers makes (``get_seq_length``, ``get_mask_sizes``) always see the last committed
    step. ``generate()`` on a caller's cache is one transaction: if it raises, wherever, the cache is as it was when
    the call began.

    Example:
        >>> cache = PagedCache(model.config, page_size=16, num_pages=1024)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        >>> cache.memory_stats()["tokens"]
    """

    is_compileable = False
    ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")  # the masks hf_flash's kernels implement

    def __init__(self, config, *, page_size=16, num_pages=None, max_memory=None, dtype=None, device=None,
                 grow=None, max_batch_size=None, cuda_graphs=True):
        config = config.get_text_config(decoder=True)
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if num_pages is not None and max_memory is not None:
            raise ValueError("give num_pages or max_memory, not both")
        if num_pages is not None and (not isinstance(num_pages, int) or num_pages < 1):
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        if max_memory is not None and (not isinstance(max_memory, int) or max_memory < 1):
            raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
        reason = self.why_not_for(config)
        if reason is not None:
            raise ValueError(f"PagedCache cannot hold this model's K/V: {reason}; use the model's default cache "
                             f"(generate() picks it for such models)")
        self.num_layers = config.num_hidden_layers
        self.config_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        # The KV heads of every pool: taken from the first key states, since tensor parallelism gives each rank a share
        # of the config's heads (the config itself is not changed). None until a layer has seen key states.
        self.num_kv_heads = None
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.page_size, self.dtype, self.device = page_size, dtype, device
        # Private: transformers 5.17's ``Cache`` has a read-only ``max_batch_size`` property (deprecated alias).
        self._max_batch_size = max_batch_size
        self._max_memory = max_memory
        self.grow = (num_pages is None and max_memory is None) if grow is None else bool(grow)
        self.cuda_graphs = bool(cuda_graphs)
        # Sized from max_memory once the first key states give the element size.
        self.page_table = PageTable(page_size, 0 if num_pages is None and max_memory is not None else num_pages or 256)
        self._step = None  # the open step: _OpenStep
        self._table_tensor = None  # (page table version, host block table)
        self._donor_layers = None  # the layers of a gone cache whose pools the first step takes over (take_pools)
        super().__init__(layers=[PagedLayer(self) for _ in range(self.num_layers)])

    def __setstate__(self, state):  # copy.deepcopy, pickle: the copied layers belong to the copy
        self.__dict__.update(state)
        self.layers = [copy.copy(layer) for layer in self.layers]  # (copy.copy would share the original's layers)
        for layer in self.layers:
            layer._cache = weakref.ref(self)

    @classmethod
    def why_not_for(cls, config):
        """Why a PagedCache cannot hold the K/V of a model with this ``config`` (None if it can): one pool per layer,
        every layer storing its own K/V with the same head dim and KV heads."""
        config = config.get_text_config(decoder=True)
        others = sorted(set(getattr(config, "layer_types", None) or []) - set(cls.ATTENTION_LAYER_TYPES))
        if others:
            return f"its layer_types include {others}, and a PagedCache holds attention layers only"
        if getattr(config, "num_kv_shared_layers", 0):  # Gemma 3n / 4: later layers attend with earlier layers' K/V
            return (f"its last {config.num_kv_shared_layers} layers attend with the K/V of earlier layers "
                    f"(num_kv_shared_layers), and every layer of a PagedCache stores its own")
        if getattr(config, "kv_lora_rank", None):  # DeepSeek V2 / V3's latent attention (MLA)
            return ("its attention stores compressed latent K/V (kv_lora_rank), whose keys and values differ in "
                    "shape")
        per_layer = sorted((getattr(config, "per_layer_attributes", None) or set())
                           & {"head_dim", "num_key_value_heads", "num_attention_heads"})
        if per_layer:  # transformers' heterogeneous configs (Gemma 4's global_head_dim, say)
            return f"its {', '.join(per_layer)} vary from layer to layer, and a PagedCache's pools share one shape"
        return None

    @property
    def num_pages(self):
        return self.page_table.num_pages

    # ------------------------------------------------------------------------------------------ the pools

    def pool_shape(self, key_states):
        if self.num_pages == 0:  # sized from the memory budget now that the element size is known
            itemsize = (self.dtype or key_states.dtype).itemsize
            per_page = 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * itemsize
            self.page_table.add_pages(max(1, self._max_memory // per_page))
        return self.num_pages, self.page_size, self.num_kv_heads, self.head_dim

    def take_pools(self, layers):
        """Take over the pools of ``layers`` (those of a PagedCache that is gone) at the first step instead of
        allocating new ones, zeroed as new ones are, if every one has the shape, dtype and device this cache's would
        have; else they are let go. All layers take theirs or none does: a graph captured over the pools reads every
        layer's. generate() gives each default cache the last one's (``hf_flash.patches.generate``)."""
        if any(layer.is_initialized for layer in self.layers):
            raise ValueError("take_pools() is for a PagedCache that has not run a step yet")
        self._donor_layers = list(layers)

    def _take_donor_pools(self, key_states):
        donors, self._donor_layers = self._donor_layers, None
        if not donors or len(donors) != self.num_layers:
            return False
        shape = self.pool_shape(key_states)
        if not all(d.is_initialized and d.keys.shape == shape and d.keys.dtype == key_states.dtype
                   and d.keys.device == key_states.device for d in donors):
            warn_once("the K/V pools taken over (generate() keeps the last call's) do not fit this cache (another "
                      "batch size, length, dtype or device): new pools, and new CUDA graphs over them")
            return False
        for layer, donor in zip(self.layers, donors):
            layer.keys, layer.values = donor.keys.zero_(), donor.values.zero_()
            layer.is_initialized = True
        return True

    def _grow_pools(self, needed):
        extra = max(self.num_pages, needed)
        with normal_tensors():
            for layer in self.layers:
                if layer.is_initialized:
                    layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((extra, *layer.keys.shape[1:]))])
                    layer.values = torch.cat([layer.values, layer.values.new_zeros((extra, *layer.values.shape[1:]))])
        self.page_table.add_pages(extra)

    def _copy_pages(self, src, dst):
        for layer in self.layers:
            if layer.is_initialized:
                s = to_device(torch.tensor(src), layer.keys.device)
                d = to_device(torch.tensor(dst), layer.keys.device)
                layer.keys[d] = layer.keys[s]
                layer.values[d] = layer.values[s]

    def _block_table(self):
        """The host block table ``[B, max_pages]`` (int32), rebuilt only when some sequence's page ids changed."""
        table = self.page_table
        if self._table_tensor is None or self._table_tensor[0] != table.version:
            width = max([len(p) for p in table.pages] + [1])
            host = torch.zeros((len(table.pages), width), dtype=torch.int32)
            for b, pages in enumerate(table.pages):
                host[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
            self._table_tensor = (table.version, host)
        return self._table_tensor[1]

    # ---------------------------------------------------------------------------------------- the step

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by each attention layer with its new ``[B, H_kv, S, D]`` states; returns a ``PagedKV`` view
        (twice, for the model's ``key, value`` unpacking). The attention function stores and attends."""
        index = _int_or_none(layer_idx)
        if index is None or not 0 <= index < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx!r} is out of range: this PagedCache was made for a model with "
                             f"{self.num_layers} layers")
        layer_idx = index
        self._check_states(key_states, value_states, layer_idx)
        layer = self.layers[layer_idx]
        if layer.is_initialized and key_states.device != layer.keys.device:
            raise ValueError(f"layer {layer_idx}'s key_states are on {key_states.device} but its pages are on "
                             f"{layer.keys.device}: a PagedCache stays where its layers first ran; make a new one "
                             f"for the model where it is now")
        if not layer.is_initialized:
            # The attention function writes the states into the pools in place: both must be on one device.
            if self.device is not None and torch.empty(0, device=self.device).device != key_states.device:
                raise ValueError(f"PagedCache(device={self.device!r}), but layer {layer_idx}'s key_states are on "
                                 f"{key_states.device}: leave device unset (each layer's pages then go to its own "
                                 f"device, as a model split with device_map needs)")
            self.num_kv_heads = key_states.shape[1]
            key_states = key_states.to(self.dtype or key_states.dtype)
            if not self._take_donor_pools(key_states):
                layer.lazy_initialization(key_states, value_states)
        view = PagedKV(self, layer_idx, key_states, value_states)
        return view, view

    def _check_states(self, key_states, value_states, layer_idx):
        """ValueError unless the states are ``[batch, heads, tokens, head_dim]`` with the pools' heads (or, before any
        pool exists, at most the config's KV heads: all of them, or a tensor-parallel rank's share) and the config's
        head dim. Checked before anything changes."""
        for name, states in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(states, torch.Tensor) or states.dim() != 4:
                raise ValueError(f"{name} must be a [batch, heads, tokens, head_dim] tensor, got "
                                 f"{tuple(getattr(states, 'shape', ())) or type(states).__name__}")
        if key_states.shape != value_states.shape:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} "
                             f"differ in shape")
        heads, head_dim = key_states.shape[1], key_states.shape[3]
        if head_dim != self.head_dim:
            raise ValueError(f"key_states {tuple(key_states.shape)} have head dim {head_dim}, but this PagedCache was "
                             f"made for head dim {self.head_dim}: was it made for another model?")
        if self.num_kv_heads is None:
            if not 1 <= heads <= self.config_kv_heads:
                raise ValueError(f"key_states {tuple(key_states.shape)} have {heads} KV heads, but this PagedCache was "
                                 f"made for a model with {self.config_kv_heads} (or a tensor-parallel share of them): "
                                 f"was it made for another model?")
        elif heads != self.num_kv_heads:
            raise ValueError(f"layer {layer_idx}'s key_states {tuple(key_states.shape)} have {heads} KV heads, but "
                             f"this PagedCache's pools hold {self.num_kv_heads} (from the key states its layers first "
                             f"saw): was it made for another model, or used by another tensor-parallel layout?")

    def begin_step(self, attention_mask, q_len, batch_size):
        """Plan a forward step: allocate pages for the valid new tokens and build the slot mapping; every layer then
        uses this plan, and the caller ends the step with ``commit_step()`` or ``abort_step()``. Raises
        ``PoolExhaustedError`` (or ``ValueError`` for a batch the cache does not hold) with nothing changed."""
        self._abandon_open_step()
        self._step = _OpenStep(self._plan(attention_mask, q_len, batch_size), explicit=True)
        return self._step.plan

    def commit_step(self):
        """Keep the open step's tokens."""
        self.page_table.commit_step()
        self._step = None

    def abort_step(self):
        """Give back everything the open step took: the cache holds exactly what it held before the step."""
        self.page_table.abort_step()
        self._step = None

    def layer_plan(self, layer_idx, attention_mask, q_len, batch_size):
        """The plan layer ``layer_idx`` stores and attends with: the open step's, or a new step's when there is none
        (a plain forward) or when this layer already stored in the open one (then the forward that opened it raised
        and was never finished: it is aborted first)."""
        step = self._step
        if step is None or layer_idx in step.stored:
            self._abandon_open_step()
            step = self._step = _OpenStep(self._plan(attention_mask, q_len, batch_size), explicit=False)
        if (q_len, batch_size) != (step.plan.q_len, len(step.plan.new_tokens)):
            raise ValueError(f"layer {layer_idx} got {batch_size} x {q_len} new tokens but the step was planned for "
                             f"{len(step.plan.new_tokens)} x {step.plan.q_len}")
        step.stored.add(layer_idx)
        return step.plan

    def layer_done(self, layer_idx):
        """Layer ``layer_idx`` stored its tokens and attended: a step no caller owns commits after the last layer."""
        step = self._step
        if step is not None and not step.explicit and len(step.stored) == self.num_layers:
            self.commit_step()

    def _abandon_open_step(self):
        if self._step is not None:  # a forward raised midway, outside hf_flash's attention, and nobody aborted
            self.abort_step()

    def _plan(self, attention_mask, q_len, batch_size):
        table = self.page_table
        valid = self._valid_new_tokens(attention_mask, q_len, batch_size)
        new_tokens = [q_len] * batch_size if valid is None else valid.sum(-1).tolist()
        if not table.pages and self._max_batch_size is not None and batch_size > self._max_batch_size:
            raise ValueError(f"batch of {batch_size} sequences exceeds max_batch_size={self._max_batch_size}")
        needed = table.pages_needed(new_tokens)
        if needed > len(table.free) and self.grow:
            self._grow_pools(needed - len(table.free))
        pads = None if valid is None else [torch.nonzero(~row).flatten().tolist() for row in valid]
        step = table.begin_step(new_tokens, q_len, pads)
        try:
            return self._plan_tensors(step, new_tokens, valid)
        except BaseException:
            table.abort_step()
            raise

    def _plan_tensors(self, step, new_tokens, valid):
        """Copy the pages the step copies on write, and build its plan: slots, lengths, block table."""
        table, q_len, batch_size = self.page_table, step.q_len, len(new_tokens)
        if step.copies:
            _, shared, fresh = zip(*step.copies)
            self._copy_pages(shared, fresh)
        before = step.lengths_before
        if q_len == 1 and valid is None:  # decode: one slot per sequence
            slots = torch.tensor([table.slots(b, n, 1)[0] for b, n in enumerate(before)], dtype=torch.int64)
        else:
            slots = torch.full((batch_size, q_len), -1, dtype=torch.int64)
            for b, new in enumerate(new_tokens):
                if new:
                    slots[b, slice(None) if valid is None else valid[b]] = torch.tensor(table.slots(b, before[b], new))
        padded = any(n != q_len for n in new_tokens)
        rows = cu = None
        if padded:
            rows = torch.nonzero(slots.flatten() >= 0).flatten()
            cu = torch.zeros(batch_size + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(new_tokens, dtype=torch.int32), 0)
        max_slot = int(slots.max().clamp_min(0)) if slots.numel() else 0
        return StepPlan(q_len=q_len, new_tokens=new_tokens, slots=slots.flatten(), max_slot=max_slot,
                        seqlens=torch.tensor(table.lengths, dtype=torch.int32), block_table=self._block_table(),
                        max_seqlen_k=max(table.lengths), padded=padded, first=not any(before), rows=rows,
                        cu_seqlens_q=cu)

    def _valid_new_tokens(self, attention_mask, q_len, batch_size):
        """Bool ``[B, q_len]`` on the host: which new tokens are not padding (from the 2-D mask's last ``q_len``
        columns), or None when all are. Padding is never stored; valid tokens keep their order. A mask that also covers
        the positions the cache holds must leave visible, in each sequence, as many of them as the cache stored."""
        if attention_mask is None:
            return None
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
                and attention_mask.shape[0] == batch_size):
            raise ValueError(f"PagedCache needs a 2-D [batch, length] padding mask (got "
                             f"{type(attention_mask).__name__} "
                             f"{tuple(getattr(attention_mask, 'shape', ()))}); use attn_implementation='hf_flash'")
        table = self.page_table
        new = attention_mask[:, -q_len:].bool()
        covers_stored = table.seen and attention_mask.shape[1] == table.seen + q_len
        if not covers_stored:
            valid = new.cpu()
            return None if bool(valid.all()) else valid
        visible = attention_mask[:, : table.seen].bool().sum(-1, dtype=torch.int32)
        host = torch.cat([new.flatten().int(), visible]).cpu()  # one read for both
        valid, visible = host[: new.numel()].view(new.shape).bool(), host[new.numel():].tolist()
        if visible != table.lengths:
            # The kernels attend exactly the stored tokens: a mask hiding one of them now (generate() feeds the pad
            # tokens it appends after an EOS as tokens, and a next turn's mask usually hides them), or showing a
            # position that was padding, would silently be ignored.
            raise ValueError(f"attention_mask leaves {visible} of the {table.seen} positions this PagedCache holds "
                             f"visible, but it stores {table.lengths} tokens there (per sequence): the mask must hide "
                             f"the positions that were padding when they were processed and show every other, such as "
                             f"the pad tokens generate() appends after an EOS, which it stores; pass the mask the "
                             f"earlier steps had, or use a DynamicCache")
        return None if bool(valid.all()) else valid

    # ---------------------------------------------------------------- what generate() and friends call

    def get_seq_length(self, layer_idx=0):
        """Positions processed per sequence (padding included) up to the last committed step."""
        return self.page_table.seen - (self._step.plan.q_len if self._step is not None else 0)

    def get_mask_sizes(self, query_length, layer_idx=0):
        # The 2-D mask covers every position, padding included; the kernels never read padding.
        return self.get_seq_length() + query_length, 0

    def get_max_length(self, layer_idx=None):
        return self.layers[0].get_max_length()

    @property
    def batch_size(self):
        return self.page_table.batch_size

    @property
    def is_croppable(self):
        return True

    def reset(self):
        """Forget every sequence; the pools are kept (and zeroed) for reuse."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys.zero_()
                layer.values.zero_()
        self._step, self._table_tensor = None, None
        self.page_table = PageTable(self.page_size, self.num_pages)

    def _sequences(self, name, indices):
        """``indices`` (ints or a bool mask over the sequences, as DynamicCache takes them) as a list of sequence
        numbers: a ValueError for negative or non-integer ones, an IndexError (as DynamicCache) past the batch."""
        self._abandon_open_step()
        batch = self.batch_size
        t = torch.as_tensor(indices)
        if t.numel() == 0 and batch:  # no sequence left, yet positions seen: a next step would start mid-sequence
            raise ValueError(f"{name} selects no sequence; reset() the cache to empty it")
        if t.dtype == torch.bool:
            if t.shape != (batch,):
                raise ValueError(f"{name} as a bool mask must have shape ({batch},), got {tuple(t.shape)}")
            t = torch.nonzero(t).flatten()
        if t.dim() != 1 or t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must be a 1-D sequence of ints (or a bool mask), got {t.dtype} {tuple(t.shape)}")
        values = t.tolist()
        if any(i < 0 for i in values):
            raise ValueError(f"{name} must be >= 0 (no wrap-around), got {values}")
        if any(i >= batch for i in values):
            raise IndexError(f"{name} {values} out of range for the cache's {batch} sequences")
        return values

    def reorder_cache(self, beam_idx):
        """Beam search: row ``i`` continues beam ``beam_idx[i]``; pages are shared, not copied."""
        self.page_table.fork(self._sequences("beam_idx", beam_idx))

    def batch_repeat_interleave(self, repeats):
        count = _int_or_none(repeats)
        if count is None or count < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        self._abandon_open_step()
        self.page_table.fork([b for b in range(self.batch_size) for _ in range(count)])

    def batch_select_indices(self, indices):
        self.page_table.fork(self._sequences("indices", indices))

    def crop(self, max_length):
        """Drop the newest positions: ``crop(-n)`` removes ``n``; ``crop(n > 0)`` keeps the first ``n``."""
        given, max_length = max_length, _int_or_none(max_length)  # transformers 5.17 passes a 0-d tensor
        if max_length is None:
            raise ValueError(f"max_length must be an int, got {given!r}")
        self._abandon_open_step()
        seen = self.page_table.seen
        keep = seen + max_length if max_length < 0 else min(max_length, seen)
        if max_length != 0 and keep < seen:
            self.page_table.crop(max(keep, 0))

    def fits_one_more_token(self):
        """Whether a step of one token per sequence fits in the pools (or they grow): at most a new page and a copy of
        a shared last page each, counted exactly only when fewer pages than that are free."""
        table = self.page_table
        return (self.grow or len(table.free) >= 2 * table.batch_size
                or table.pages_needed([1] * table.batch_size) <= len(table.free))

    def snapshot(self):
        """The bookkeeping, for ``restore``: what a transaction over several steps (``generate()``) rolls back to."""
        self._abandon_open_step()
        return self.page_table.snapshot()

    def restore(self, snapshot):
        """Back to what ``snapshot()`` saw; pages taken since are free again (their contents are never read)."""
        self._step = None
        self.page_table.restore(snapshot)

    @contextlib.contextmanager
    def transaction(self):
        """Steps inside that raise, wherever, leave the cache as it was when the block began: the pages it held then
        stay allocated until the block ends (beams a fork drops, a crop: their pages are not written over), and are
        restored if anything raises."""
        self._abandon_open_step()
        before = self.page_table.pin()
        try:
            yield
        except BaseException:
            self.restore(before)
            raise
        self.page_table.unpin(before)

    def memory_stats(self):
        """Pages used and free, bytes allocated to the pools and the bytes the held tokens need, tokens held."""
        self._abandon_open_step()
        table = self.page_table
        bytes_per_page = sum(2 * layer.keys[0].numel() * layer.keys.element_size()
                             for layer in self.layers if layer.is_initialized)
        used = table.num_pages - len(table.free)
        return {"page_size": self.page_size, "pages_total": table.num_pages, "pages_used": used,
                "pages_free": len(table.free), "tokens": sum(table.lengths),
                "bytes_allocated": table.num_pages * bytes_per_page, "bytes_used": used * bytes_per_page,
                "bytes_per_token": bytes_per_page // self.page_size}


@dataclasses.dataclass
class _OpenStep:
    plan: StepPlan
    explicit: bool  # begun by a caller (the CUDA-graph runner), which commits it; else the last layer commits it
    stored: set = dataclasses.field(default_factory=set)  # layers that have stored their tokens in this step

"""CUDA-graph replay of ``generate()``'s single-token decode steps over a ``PagedCache``.

A decode step of a few sequences is bound by the host: transformers' Python and one kernel launch after another,
layer after layer, while the GPU waits. ``generate()`` asks the model for a "compiled call" to run its decode steps
(``get_compiled_call``); for a ``PagedCache`` hf_flash answers with ``DecodeGraphs`` (``hf_flash.patches.generate``),
which captures the step once per (batch size, split count) as a CUDA graph and replays it.

Host work stays outside the graph, as in FlashInfer's plan/run split: the cache plans the step (pages, the slot of
each new token, lengths) and the runner copies that plan, the token ids and the positions into the graph's static
buffers before each replay. The kernels read every length from those buffers, so one graph serves each step until
the longest sequence moves the split count into another bucket (powers of two). The first step of a bucket runs
eagerly on the static buffers, which compiles the kernels for exactly those arguments; the second one captures.
"""
import weakref

import torch

from . import ops
from .cache import PagedCache, copy_from_host
from .internals import CACHE_NAME, warn_once

# The arguments of a decode step that a graph reproduces; a step with any other argument set runs eagerly.
_STEP_ARGS = {"input_ids", "position_ids", "attention_mask", CACHE_NAME, "use_cache", "return_dict", "logits_to_keep"}


# The step graphs captured over each cache's pools, by (model, batch, splits, logits_to_keep, pool size): the runner
# owns them, the cache knows nothing of them, and they go with the cache. A pool that grew is a new pool: the graphs
# captured over the old one are dropped.
_captured = weakref.WeakKeyDictionary()


def captured_graphs(cache):
    """The decode-step graphs held for ``cache`` (empty if its steps never went through the runner)."""
    return _captured.get(cache, {})


class _StepGraph:
    """The static inputs of one (model, batch, splits) step, its graph once captured, and the logits replays write."""

    def __init__(self, cache, batch, device):
        self.input_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.plan_tensors = {
            "slots": torch.zeros(batch, dtype=torch.int64, device=device),
            "seqlens": torch.zeros(batch, dtype=torch.int32, device=device),
            "block_table": torch.zeros((batch, cache.num_pages), dtype=torch.int32, device=device),  # the widest
            "rows": None, "cu_seqlens_q": None,  # padded steps are never captured
        }
        self.table_source = None  # the host block table last copied in (the cache makes a new one on any change)
        self.graph = None
        self.logits = None
        self.output_type = None
        self.warm = False  # the step ran eagerly on these buffers once

    def load(self, plan, input_ids, position_ids, device):
        """Copy this step's inputs and plan into the static buffers; the layers read the plan from them."""
        self.input_ids.copy_(input_ids, non_blocking=True)
        self.position_ids.copy_(position_ids, non_blocking=True)
        copy_from_host(self.plan_tensors["slots"], plan.slots)
        copy_from_host(self.plan_tensors["seqlens"], plan.seqlens)
        if plan.block_table is not self.table_source:
            copy_from_host(self.plan_tensors["block_table"], plan.block_table)
            self.table_source = plan.block_table
        plan.use(device, self.plan_tensors)


class DecodeGraphs:
    """What ``model.get_compiled_call()`` gives for an hf_flash model: decode steps over a ``PagedCache`` replay CUDA
    graphs (on CPU they run eagerly through the same static buffers); calls with any other cache go to ``fallback()``,
    transformers' own compiled call."""

    def __init__(self, model, fallback):
        self.model = model
        self.fallback = fallback

    def __call__(self, **kwargs):
        cache = kwargs.get(CACHE_NAME)
        if not isinstance(cache, PagedCache):
            return self.fallback()(**kwargs)
        if not self._is_plain_decode_step(cache, kwargs):
            return self.model(**kwargs)
        input_ids = kwargs["input_ids"]
        batch, device = input_ids.shape[0], input_ids.device
        reason = self._why_eager(cache, device)
        if reason is not None:
            warn_once(f"decode steps run eagerly, not as CUDA graphs: {reason}")
            return self.model(**kwargs)
        plan = cache.begin_step(kwargs.get("attention_mask"), 1, batch)  # every layer then uses this plan
        if plan.padded:
            cache.abort_step()
            return self.model(**kwargs)
        try:
            output = self._run(cache, plan, kwargs, device)
        except BaseException:
            cache.abort_step()
            raise
        cache.commit_step()
        return output

    def _run(self, cache, plan, kwargs, device):
        """The planned step: eagerly on the static buffers the first time, captured the second, replayed after."""
        input_ids = kwargs["input_ids"]
        batch = input_ids.shape[0]
        # The pools' KV heads: under tensor parallelism this rank's share, which is what the decode kernel launches on.
        splits = ops.choose_num_splits(batch, cache.num_kv_heads, plan.max_seqlen_k, device)
        plan.num_splits = 1 << (splits.bit_length() - 1)
        logits_to_keep = kwargs.get("logits_to_keep")
        key = (id(self.model), batch, plan.num_splits, logits_to_keep, cache.num_pages)
        graphs = _captured.setdefault(cache, {})
        if key not in graphs:
            for stale in [k for k in graphs if k[-1] != cache.num_pages]:  # captured over pools since grown
                del graphs[stale]
            graphs[key] = _StepGraph(cache, batch, device)
        step_graph = graphs[key]
        step_graph.load(plan, input_ids, kwargs["position_ids"], device)
        step = {"input_ids": step_graph.input_ids, "position_ids": step_graph.position_ids, CACHE_NAME: cache,
                "use_cache": True, "return_dict": True}
        if logits_to_keep is not None:
            step["logits_to_keep"] = logits_to_keep
        if step_graph.graph is None:
            if device.type != "cuda" or not step_graph.warm:
                step_graph.warm = True
                return self._eager(step, device)
            self._capture(step_graph, step, cache)
        step_graph.graph.replay()
        # A copy: the next replay overwrites the static logits, and a caller may keep these.
        return step_graph.output_type(logits=step_graph.logits.clone(), **{CACHE_NAME: cache})

    @staticmethod
    def _is_plain_decode_step(cache, kwargs):
        """One new token per sequence, given by ids and positions, nothing else asked of the model, every cache layer
        holding pages already."""
        if any(name not in _STEP_ARGS and value is not None and value is not False for name, value in kwargs.items()):
            return False
        ids, positions = kwargs.get("input_ids"), kwargs.get("position_ids")
        if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 1
                and isinstance(positions, torch.Tensor) and positions.shape == ids.shape):
            return False
        if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
            return False
        if not isinstance(kwargs.get("logits_to_keep", 0), int) or ids.shape[0] != cache.batch_size:
            return False
        return all(layer.is_initialized for layer in cache.layers)

    def _why_eager(self, cache, device):
        """Why this model's decode steps cannot be captured as graphs on ``device`` (None if they can)."""
        pool_devices = {layer.keys.device for layer in cache.layers}
        if pool_devices != {device}:
            # A graph captures the work queued on one device's stream; layers elsewhere would run outside it.
            return (f"this model's layers are on {', '.join(sorted(map(str, pool_devices)))} and its inputs on "
                    f"{device} (a model split over devices with device_map); CUDA graphs need every layer on the "
                    f"inputs' device")
        # Modules accelerate keeps off the device they run on: on disk, or on the CPU while the steps run elsewhere.
        offloaded = sorted(name for name, where in getattr(self.model, "hf_device_map", {}).items()
                           if str(where) == "disk" or (str(where) == "cpu" and device.type != "cpu"))
        if offloaded:
            # accelerate's hooks copy these modules' weights in from the host at every forward: a replay would not.
            return (f"accelerate offloads {', '.join(offloaded)} to the CPU or disk (device_map), and loads their "
                    f"weights anew at every step")
        return None

    def _eager(self, step, device):
        if device.type != "cuda":
            return self.model(**step)
        # On a side stream, as torch.cuda.graph's documentation asks of the runs before a capture.
        main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            output = self.model(**step)
        main.wait_stream(side)
        return output

    def _capture(self, step_graph, step, cache):
        """Capture the step (which it does not run). A model that cannot be captured (one that syncs with the host
        inside its forward, say) raises (and the caller aborts the step): after a failed capture torch's CUDA random
        generator refuses further work in this process, so running on eagerly is no way out."""
        pools = [g.graph.pool() for g in captured_graphs(cache).values() if g.graph is not None]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pools[0] if pools else None):
                output = self.model(**step)
        except Exception as e:
            raise RuntimeError(f"hf_flash could not capture this model's decode step as a CUDA graph "
                               f"({type(e).__name__}: {e}); call generate(..., disable_compile=True) or give it "
                               f"PagedCache(config, cuda_graphs=False) to decode eagerly") from e
        # Only the logits are kept: the output also holds the cache, which holds this object (a reference cycle).
        step_graph.graph, step_graph.logits, step_graph.output_type = graph, output.logits, type(output)

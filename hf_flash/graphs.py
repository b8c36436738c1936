"""Single-token decode steps over a ``PagedCache``, compiled by torch.compile and replayed as CUDA graphs.

A decode step of a few sequences is bound by the host and by memory: transformers' Python and one small kernel after
another, layer after layer. gpt-fast's answer is to compile the whole step (the compiler fuses the norms, rotary and
MLP glue around the attention kernels, which it sees as custom ops) and to replay it as one CUDA graph. Two step
functions go through this module's ``run_step``:

* ``decode_step``, hf_flash's own decode loop (``hf_flash.decoding``): the forward and the choice of the next token.
* ``forward_step``, the "compiled call" transformers' loops ask for (``get_compiled_call``: greedy search and
  sampling with processors that read the ids, an assistant model's steps), answered by ``DecodeGraphs``: the forward
  alone, returning logits, for steps of one token a sequence; forwards of several (prefill chunks, assisted
  decoding's checks of its candidates) run eagerly. Beam search never asks (transformers 5.17 to 5.25 call the model
  itself there): its steps run eagerly. The log says so once (``hf_flash.patches.generate``).

Host work stays outside the graph, as in FlashInfer's plan/run split: the caller begins the step (the cache plans
pages, slots and lengths), ``run_step`` copies the plan, the token ids and the positions into the graph's static
buffers, replays, and commits the step (or aborts it if anything raised). The kernels read every length from those
buffers, and the plan's host-side bounds are widened to the pools' capacity, so one graph serves each step until the
longest sequence moves the split count into another bucket (powers of two). The first step of a (batch, splits, pool)
key runs the compiled function on the static buffers (compiling it, and the Triton kernels, for exactly those
arguments); the second one captures it.
"""
import contextlib
import functools
import inspect
import itertools
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import ops
from .cache import PagedCache, copy_from_host, normal_tensors
from .internals import CACHE_NAME, warn_once

# The arguments of a decode step that a graph reproduces; a step with any other argument set runs eagerly.
_STEP_ARGS = {"input_ids", "position_ids", "attention_mask", CACHE_NAME, "use_cache", "return_dict", "logits_to_keep"}

# torch.compile's backend for the steps, by device type; a device not listed runs the step functions uncompiled.
# fallback_random: sampling draws from torch's own generator, so a seed gives the tokens an eager loop gives.
# coordinate_descent_tuning (gpt-fast's setting): inductor turns one-row matmuls (a decode step of one sequence) into
# reductions it tunes, which read the weights faster than cuBLAS's GEMM there (measured on the H200: 8B-shaped model,
# B=1, 196 tok/s instead of 176), at the price of a longer first compile.
# triton.enable_pdl: inductor launches the step's kernels with programmatic dependent launch (on Hopper and newer;
# inductor checks the GPU), so each is scheduled while the one before it finishes and reads what does not depend on
# it (the weights) before waiting for it. A batch-1 step is about 180 small kernels, and the gaps between them were up
# to a fifth of its time (H200, 1B-shaped, generate() at 1 x 512: 777 and 872 tok/s without, 977 and 951 with, two
# alternating pairs; at 128 x 512, where the step is larger, -5 % and +6 %: no effect beyond the noise; BENCHMARKS.md).
# A torch whose inductor lacks the option compiles without it, and says so once (``inductor_options``).
# Compiled with dynamic shapes and ints from the start: one graph for every length, split count and pool size (a
# static first compile would be followed by a recompile at the second step, whose lengths differ); a new batch size
# compiles once more.
COMPILE_BACKENDS = {"cuda": "inductor"}
# Each batch size, and each token choice (greedy, or sampling with its processors), compiles the step anew (dynamo
# guards on them); past torch's default of 8 compiles a function, every further one would run uncompiled unsaid.
STEP_RECOMPILE_LIMIT = 64
_INDUCTOR_OPTIONS = {"fallback_random": True, "coordinate_descent_tuning": True, "triton.enable_pdl": True}
_compiled = {}  # compile settings (step function first) -> its torch.compile wrapper
# The BLAS library of the step's matmuls (the projections and the MLP, at as many rows as the batch has sequences),
# set while the step runs for the first time and while it is captured (the graph keeps the kernels chosen then), and
# restored after. At those few rows cuBLASLt's kernels beat cuBLAS's (a 2026-12-02 profile had cuBLAS reading the
# 1B-shaped k/v weights at ~0.4 TB/s at 64 rows): generate()'s 1B-shaped decode on the H200, two A/B runs,
# +3.5 % to +5.4 % at B = 8, 64 and 128 (BENCHMARKS.md). At a batch of one inductor makes its own reductions of the
# matmuls (above).
STEP_BLAS_LIBRARY = "cublaslt"


def forward_step(model, cache, input_ids, position_ids, logits_to_keep):
    """The model's forward over the cache: its logits."""
    kwargs = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=True, return_dict=True,
                 **{CACHE_NAME: cache}, **kwargs).logits


def decode_step(model, cache, input_ids, position_ids, select):
    """The forward of the last token and the choice of the next: ``[B]`` token ids."""
    return select(forward_step(model, cache, input_ids, position_ids, logits_to_keep=1)[:, -1])


def compiled(step_function, device, compile_config=None):
    """``step_function`` compiled for ``device`` (as is where no backend is set for it). A ``compile_config`` given to
    ``generate()`` (transformers' ``CompileConfig``) sets the backend, ``fullgraph``, ``dynamic`` and the backend's
    options; its ``mode`` adds inductor's options for that mode, but never CUDA graphs: the runner captures its own."""
    backend = COMPILE_BACKENDS.get(device.type)
    if backend is None:
        return step_function
    config = {"backend": backend, "fullgraph": False, "dynamic": True, "options": None}
    if compile_config is not None:
        config.update(backend=compile_config.backend, fullgraph=compile_config.fullgraph,
                      options=compile_config.options)
        if compile_config.dynamic is not None:
            config["dynamic"] = compile_config.dynamic
    if config["backend"] == "inductor":
        from torch._inductor import list_mode_options

        mode = getattr(compile_config, "mode", None)
        config["options"] = {**inductor_options(), **(list_mode_options(mode) if mode else {}),
                             **(config["options"] or {}), "triton.cudagraphs": False}
    key = (step_function, *(repr(sorted(v.items())) if isinstance(v, dict) else v for v in config.values()))
    if key not in _compiled:
        _compiled[key] = torch.compile(step_function, **config, **_recompile_limit())
    return _compiled[key]


@functools.cache
def _recompile_limit():
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": STEP_RECOMPILE_LIMIT}
    warn_once(f"this torch's torch.compile takes no recompile_limit: past {torch._dynamo.config.recompile_limit} "
              f"batch sizes and token choices in one process (torch._dynamo.config.recompile_limit), decode steps "
              f"run uncompiled")
    return {}


@functools.cache  # a process's torch does not change: asked once, not at every step of transformers' loop
def inductor_options():
    """hf_flash's inductor options for the steps: ``_INDUCTOR_OPTIONS`` less those this torch's inductor lacks (each
    said once)."""
    from torch._inductor import config as inductor_config

    options = {}
    for name, value in _INDUCTOR_OPTIONS.items():
        owner, _, leaf = name.rpartition(".")
        if hasattr(functools.reduce(getattr, owner.split(".") if owner else [], inductor_config), leaf):
            options[name] = value
        else:
            warn_once(f"this torch's inductor has no {name!r} option: decode steps are compiled without it (slower)")
    return options


# The step graphs captured over each set of pools, by (model, batch, splits, step, pool size), keyed by the first
# layer's K pool (the layers' pools come and go together: made at a cache's first step, grown together, taken over
# together by a later cache): the runner owns them, the cache knows nothing of them, and they go with the pools. A pool
# that grew is a new pool: the graphs captured over the old one go with it.
_captured = WeakIdKeyDictionary()


def captured_graphs(cache):
    """The decode-step graphs held for ``cache``'s pools (empty if its steps never went through the runner)."""
    layer = cache.layers[0]
    return _captured.get(layer.keys, {}) if layer.is_initialized else {}


_model_numbers = weakref.WeakKeyDictionary()  # model -> a number no other model of this process gets
_next_model_number = itertools.count()


def _model_number(model):
    """A number no other model of this process gets: not ``id(model)``, which a later model can reuse (and would replay
    graphs that read the first one's freed weights), nor the model itself, which the graphs would keep alive."""
    if model not in _model_numbers:
        _model_numbers[model] = next(_next_model_number)
    return _model_numbers[model]


def model_key(model):
    """What a graph key holds of the model: its number and where its weights are. A captured step reads the parameters
    and buffers at their addresses then: after ``model.half()``, ``.to()`` or weights assigned anew, the same model
    gets new graphs instead of replays reading freed tensors. Made once per generate() call (a pass over the
    parameters)."""
    weights = itertools.chain(model.parameters(), model.buffers())
    return _model_number(model), hash(tuple((t.data_ptr(), t.dtype) for t in weights))


class _StepGraph:
    """The static inputs of one (model, batch, splits, step) key, its graph once captured, and the output that
    replays write."""

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
        self.output = None
        self.warm = False  # the step ran on these buffers once

    def load(self, plan, input_ids, position_ids, device):
        """Copy this step's inputs and plan into the static buffers; the layers read the plan from them. Without
        ``position_ids`` each new token's position is the count of the tokens stored before it, taken from the
        plan's lengths already on the device."""
        self.input_ids.copy_(input_ids, non_blocking=True)
        copy_from_host(self.plan_tensors["slots"], plan.slots)
        copy_from_host(self.plan_tensors["seqlens"], plan.seqlens)
        if position_ids is None:
            torch.sub(self.plan_tensors["seqlens"][:, None], 1, out=self.position_ids)
        else:
            self.position_ids.copy_(position_ids, non_blocking=True)
        if plan.block_table is not self.table_source:
            copy_from_host(self.plan_tensors["block_table"], plan.block_table)
            self.table_source = plan.block_table
        plan.use(device, self.plan_tensors)


def why_not_graphed(model, cache, device):
    """Why ``model``'s decode steps over ``cache`` cannot be captured as graphs on ``device`` (None if they can)."""
    device_map = getattr(model, "hf_device_map", {})
    # Modules accelerate keeps off the device they run on: on disk, or on the CPU while the steps run elsewhere.
    offloaded = sorted(name for name, where in device_map.items()
                       if str(where) == "disk" or (str(where) == "cpu" and device.type != "cpu"))
    if offloaded:
        # accelerate's hooks copy these modules' weights in from the host at every forward: a replay would not.
        return (f"accelerate offloads {', '.join(offloaded)} to the CPU or disk (device_map), and loads their "
                f"weights anew at every step")
    # Where the layers' pages are, or before there are any, where accelerate put the modules.
    placements = {layer.keys.device for layer in cache.layers if layer.is_initialized} or {
        torch.device(where) if isinstance(where, str) else torch.device("cuda", where) for where in device_map.values()}
    if placements - {device}:
        # A graph captures the work queued on one device's stream; layers elsewhere would run outside it.
        return (f"this model's layers are on {', '.join(sorted(map(str, placements)))} and its inputs on "
                f"{device} (a model split over devices with device_map); CUDA graphs need every layer on the "
                f"inputs' device")
    return None


def run_step(step, key, cache, plan, input_ids, position_ids=None):
    """Run the begun single-token step ``step(input_ids, position_ids)`` (which closes over the model and the cache)
    through the static buffers of ``key`` ((``model_key(model)``, what the step computes and the function computing
    it, which a ``compile_config`` picks)): the first time on them (on CUDA compiling the step), captured the second,
    replayed after; then commit it, or abort it if anything raised. Returns the step's output, which the next replay
    of this key overwrites. ``position_ids`` default to the count of each sequence's stored tokens."""
    try:
        output = _run(step, key, cache, plan, input_ids, position_ids)
    except BaseException:
        cache.abort_step()
        raise
    cache.commit_step()
    return output


def _run(step, key, cache, plan, input_ids, position_ids):
    batch, device = input_ids.shape[0], input_ids.device
    pools = cache.layers[0].keys
    # The pools' KV heads: under tensor parallelism this rank's share, which is what the decode kernel launches on.
    splits = ops.choose_num_splits(batch, cache.num_kv_heads, plan.max_seqlen_k, device, head_dim=pools.shape[-1],
                                   dtype=pools.dtype)
    plan.num_splits = 1 << (splits.bit_length() - 1)
    # Bounds the host checks against and nothing else reads: at the pools' capacity they are the same at every step,
    # so the compiled step is not specialized to one step's lengths.
    plan.max_seqlen_k = cache.num_pages * cache.page_size
    plan.max_slot = plan.max_seqlen_k - 1
    model_id, what = key  # model_key(model), the step
    key = (model_id, batch, plan.num_splits, what, cache.num_pages)
    graphs = _captured.setdefault(cache.layers[0].keys, {})
    if key not in graphs:
        with normal_tensors():  # later steps outside inference mode write them
            graphs[key] = _StepGraph(cache, batch, device)
    step_graph = graphs[key]
    step_graph.load(plan, input_ids, position_ids, device)
    if step_graph.graph is None:
        if device.type != "cuda" or not step_graph.warm:
            output = _first_run(step, step_graph, device)
            step_graph.warm = True  # only once a run went through: a capture must not be the step's first run
            return output
        _capture(step, step_graph, cache)
    step_graph.graph.replay()
    return step_graph.output


def _first_run(step, step_graph, device):
    if device.type != "cuda":
        # Into one output buffer per key, as replays write theirs: a caller that reads a step's output after
        # running the next one reads the next one's, here as on CUDA.
        output = step(step_graph.input_ids, step_graph.position_ids)
        if step_graph.output is None:
            with normal_tensors():
                step_graph.output = output.clone()
        else:
            step_graph.output.copy_(output)
        return step_graph.output
    # On a side stream, as torch.cuda.graph's documentation asks of the runs before a capture.
    main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side), step_blas_library():
        output = step(step_graph.input_ids, step_graph.position_ids)
    main.wait_stream(side)
    return output


@contextlib.contextmanager
def step_blas_library():
    """Torch's CUDA matmuls go to ``STEP_BLAS_LIBRARY`` inside, to the library preferred before after. A torch build
    that refuses it (built without it) keeps its own, and says so once."""
    before = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library(STEP_BLAS_LIBRARY)
    except RuntimeError as e:
        warn_once(f"decode steps keep torch's BLAS library ({before.name}), not {STEP_BLAS_LIBRARY}: {e}")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def _capture(step, step_graph, cache):
    """Capture the step (which it does not run). A model that cannot be captured (one that syncs with the host inside
    its forward, say) raises (and the caller aborts the step): after a failed capture torch's CUDA random generator
    refuses further work in this process, so running on eagerly is no way out."""
    pools = [g.graph.pool() for g in captured_graphs(cache).values() if g.graph is not None]
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pools[0] if pools else None), step_blas_library():
            output = step(step_graph.input_ids, step_graph.position_ids)
    except Exception as e:
        raise RuntimeError(f"hf_flash could not capture this model's decode step as a CUDA graph "
                           f"({type(e).__name__}: {e}); call generate(..., disable_compile=True) or give it "
                           f"PagedCache(config, cuda_graphs=False) to decode eagerly") from e
    step_graph.graph, step_graph.output = graph, output


class DecodeGraphs:
    """What ``model.get_compiled_call()`` gives for an hf_flash model: decode steps over a ``PagedCache`` run
    ``forward_step`` through ``run_step`` (on CPU eagerly, through the same static buffers); calls with any other
    cache go to ``fallback()``, transformers' own compiled call."""

    def __init__(self, model, fallback, compile_config=None):
        self.model = model
        self.model_key = model_key(model)  # transformers asks for its compiled call once per generate() call
        self.fallback = fallback
        self.compile_config = compile_config

    def __call__(self, **kwargs):
        cache = kwargs.get(CACHE_NAME)
        if not isinstance(cache, PagedCache):
            return self.fallback()(**kwargs)
        if not self._is_plain_decode_step(cache, kwargs):
            return self.model(**kwargs)
        input_ids = kwargs["input_ids"]
        reason = why_not_graphed(self.model, cache, input_ids.device)
        if reason is not None:
            warn_once(f"decode steps run eagerly, not as CUDA graphs: {reason}")
            return self.model(**kwargs)
        logits_to_keep = kwargs.get("logits_to_keep")
        forward = compiled(forward_step, input_ids.device, self.compile_config)
        # Begun right before run_step, which ends it: nothing between can leave it open.
        plan = cache.begin_step(kwargs.get("attention_mask"), 1, input_ids.shape[0])  # every layer uses this plan
        if plan.padded:
            cache.abort_step()
            return self.model(**kwargs)
        logits = run_step(lambda ids, positions: forward(self.model, cache, ids, positions, logits_to_keep),
                          (self.model_key, ("forward", logits_to_keep, forward)), cache, plan, input_ids,
                          kwargs["position_ids"])
        # A copy: the next replay overwrites the static logits, and a caller may keep these.
        return CausalLMOutputWithPast(logits=logits.clone(), **{CACHE_NAME: cache})

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

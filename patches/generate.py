"""``generate()`` for models whose attention implementation is ``"hf_flash"``: a ``PagedCache`` by default, long
prompts prefilled in chunks, and decode steps replayed as CUDA graphs.

transformers has no registry of cache implementations, so we wrap ``GenerationMixin._prepare_cache_for_generation``:
after it has made its default ``DynamicCache`` (the caller passed no cache and no ``cache_implementation``), we swap
in a ``PagedCache`` sized for this call (batch x beams x max length), so it never runs out and holds about the tokens
actually generated. ``_prefill`` gets a default ``prefill_chunk_size`` for a ``PagedCache``: each chunk attends to the
pages of the earlier ones in place, and the activations of the forward shrink with the chunk. Greedy search and
sampling over a ``PagedCache`` on CUDA run hf_flash's own loop (``_sample`` -> ``hf_flash.decoding``: every step,
forward and token choice, compiled and replayed as a CUDA graph); what that loop does not cover runs transformers' loop,
whose decode steps call the model's "compiled call" when ``_valid_auto_compile_criteria`` allows it: for a
``PagedCache`` on CUDA that is ``hf_flash.graphs.DecodeGraphs`` (compiled, graphed forwards).
``disable_compile=True`` or ``PagedCache(cuda_graphs=False)`` keep every step eager. ``generate`` itself is wrapped
only to make a call on a caller's ``PagedCache`` a transaction.

Each wrapped internal is checked when the patches are applied (``hf_flash.internals``): one that this transformers
release lacks is left alone, and the logger says once what is off.
"""
import functools
import inspect
import weakref

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerationMixin

from .. import decoding
from ..cache import PagedCache
from ..graphs import DecodeGraphs, why_not_graphed
from ..integration import NAME
from ..internals import CACHE_NAME, has, warn_once

PAGE_SIZE = 16
# Prompts are prefilled in chunks of about this many tokens over the whole batch (vLLM's default token budget is of
# this order): enough tokens per chunk to keep the GPU's matrix units busy, a fraction of a long batch's activations.
PREFILL_CHUNK_TOKENS = 16384
# From this many prompt tokens over the batch, prompts are prefilled in two chunks at least, even where the budget would
# take them whole: the cache holds the new tokens' pages from the start, where a DynamicCache holds the prompts alone,
# and half the prompts' activations pay for them (H200, 8B-shaped, one prompt of 4096 tokens and 128 new, prefilled
# whole: peak memory 19 MB over sdpa's). Fewer tokens leave the forward host-bound (an eager forward is ~30 ms of
# Python for ~3 ms of GPU work): a second one would more than double the time to first token (1B-shaped, one prompt
# of 512: H200 0.021 -> 0.050 s, H100 0.031 -> 0.075 s, for 4.7 MB).
TWO_CHUNKS_FROM = 2048
# Model inputs that a prefill chunk may carry besides the ids; with any other tensor input (images, ...) the prompt
# is prefilled whole, as transformers cannot split those.
_TEXT_INPUTS = {"attention_mask", "position_ids", "token_type_ids"}

_original_generate = GenerationMixin.generate
_original_prepare_cache = GenerationMixin._prepare_cache_for_generation
_original_prefill = GenerationMixin._prefill
_original_compile_criteria = GenerationMixin._valid_auto_compile_criteria
_original_sample = GenerationMixin._sample
_original_compiled_call = PreTrainedModel.get_compiled_call
_prepare_cache_signature = inspect.signature(_original_prepare_cache)
# Each model's last default cache (weakly) and its layers, which hold its pools (strongly): like transformers' static
# cache, the pools stay allocated between generate() calls, for the next call of the same size (release_kept_pools).
_kept = weakref.WeakKeyDictionary()  # model -> (weak reference to the cache, its layers)


def _callers_paged_cache(kwargs):
    cache = kwargs.get(CACHE_NAME, kwargs.get("past_key_values"))
    return cache if isinstance(cache, PagedCache) else None


@functools.wraps(_original_generate)
def generate(self, *args, **kwargs):
    """``generate()`` on a caller's ``PagedCache`` is a transaction: if it raises (an interrupt, out of memory, a
    failed step), the cache is as it was when the call began, so the turn can be retried."""
    cache = _callers_paged_cache(kwargs)
    if cache is None:
        return _original_generate(self, *args, **kwargs)
    with cache.transaction():
        return _original_generate(self, *args, **kwargs)


@functools.wraps(_original_prepare_cache)
def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    given = model_kwargs.get(CACHE_NAME)  # the caller's cache, any kind: it is the one that must fill
    result = _original_prepare_cache(self, generation_config, model_kwargs, *args, **kwargs)
    if self.config._attn_implementation != NAME or self.config.is_encoder_decoder:
        return result
    cache = model_kwargs.get(CACHE_NAME)
    bound = _prepare_cache_signature.bind(self, generation_config, model_kwargs, *args, **kwargs).arguments
    if given is None and type(cache) is DynamicCache and generation_config.cache_implementation is None:
        reason = PagedCache.why_not_for(self.config)
        if reason is not None:
            warn_once(f"generate() keeps transformers' cache for {type(self).__name__} (no PagedCache, CUDA graphs or "
                      f"chunked prefill): {reason}")
            return result
        copies = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        sequences = bound["batch_size"] * copies
        pages_per_sequence = -(-bound["max_cache_length"] // PAGE_SIZE)
        model_kwargs[CACHE_NAME] = _default_cache(self, sequences * (pages_per_sequence + 1))
    elif cache is None and generation_config.use_cache and any(isinstance(v, Cache) for v in model_kwargs.values()):
        warn_once(f"generate() keeps its cache under another name than {CACHE_NAME!r} in this transformers release, "
                  f"so it runs on transformers' own cache: no PagedCache, CUDA graphs or chunked prefill")
    cache = model_kwargs.get(CACHE_NAME)
    if isinstance(cache, PagedCache) and cache.cuda_graphs and not generation_config.disable_compile:
        _say_what_runs_eagerly(self, generation_config, bound.get("generation_mode"))
    return result


def _say_what_runs_eagerly(model, generation_config, mode):
    """Log (once) the decode steps over a PagedCache that hf_flash's compiled loop and CUDA graphs do not cover."""
    if not graphs_run_on(model.device):
        warn_once(f"decode steps on {model.device.type} run eagerly: hf_flash's compiled decode loop and its CUDA "
                  f"graphs are CUDA-only")
    elif (generation_config.num_beams or 1) > 1:
        warn_once("beam search runs its decode steps eagerly, not as CUDA graphs: transformers' beam search calls the "
                  "model itself, not its compiled call")
    elif mode == GenerationMode.ASSISTED_GENERATION:
        warn_once("assisted decoding checks its candidates (several tokens a sequence) eagerly; the assistant's own "
                  "steps are replayed as CUDA graphs")


def _default_cache(model, num_pages):
    """The ``PagedCache`` of a generate() call given none: it takes over the pools of the model's last one if that
    cache is gone (no output of its call holds it) and had the same size; so the decode graphs captured over those
    pools serve this call too, instead of its first steps being run and captured anew (~17 ms a call on the H200)."""
    kept = _kept.pop(model, None)
    # grow: an assistant model's cache is made for its first candidate round only, and later rounds reuse it.
    cache = PagedCache(model.config, page_size=PAGE_SIZE, grow=True, num_pages=num_pages)
    if kept is not None and kept[0]() is None:  # take_pools lets them go at the first step if they do not fit
        cache.take_pools(kept[1])
    elif kept is not None:
        warn_once("generate() makes new K/V pools (and captures its CUDA graphs anew) while the last call's output "
                  "still holds that call's cache: its pools serve the next call once nothing holds the output")
    _kept[model] = (weakref.ref(cache), cache.layers)
    return cache


def release_kept_pools(model):
    """Free the K/V pools that generate() keeps for ``model``'s next call without a cache, and the decode graphs
    captured over them (they are freed anyway when the model is, or when a call of another size replaces them)."""
    _kept.pop(model, None)


@functools.wraps(_original_prefill)
def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
    cache = model_kwargs.get(CACHE_NAME)
    batch, prompt = input_ids.shape[0], input_ids.shape[-1]
    chunk = max(PAGE_SIZE, PREFILL_CHUNK_TOKENS // max(batch, 1) // PAGE_SIZE * PAGE_SIZE)
    if batch * prompt >= TWO_CHUNKS_FROM:
        chunk = min(chunk, -(-prompt // (2 * PAGE_SIZE)) * PAGE_SIZE)  # half the prompt, in whole pages
    # Asked for the prompt's hidden states or attentions, transformers' chunked prefill returns the last chunk's only.
    per_token_outputs = generation_config.output_hidden_states or generation_config.output_attentions
    held = cache.get_seq_length() if isinstance(cache, PagedCache) else 0
    if held and prompt - held > chunk:
        # transformers 5.17 chunks the whole conversation's ids, history included, not the ones the cache lacks.
        warn_once("a chat's next turn on a PagedCache holding tokens is prefilled in one forward, not in chunks")
    if not (isinstance(cache, PagedCache) and generation_config.prefill_chunk_size is None
            and not held and prompt > chunk and not per_token_outputs
            and all(name in _TEXT_INPUTS for name, value in model_kwargs.items() if isinstance(value, torch.Tensor))):
        return _original_prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs)
    generation_config.prefill_chunk_size = chunk
    try:
        return _original_prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs)
    finally:
        generation_config.prefill_chunk_size = None


def graphs_run_on(device):
    """Whether decode steps on ``device`` replay CUDA graphs (tests let CPU run the same path eagerly)."""
    return device.type == "cuda"


@functools.wraps(_original_compile_criteria)
def _valid_auto_compile_criteria(self, model_kwargs, generation_config):
    cache = model_kwargs.get(CACHE_NAME)
    if isinstance(cache, PagedCache):  # torch.compile cannot trace a PagedCache step; its CUDA graphs replace it
        return cache.cuda_graphs and graphs_run_on(self.device) and not generation_config.disable_compile
    return _original_compile_criteria(self, model_kwargs, generation_config)


@functools.wraps(_original_compiled_call)
def get_compiled_call(self, compile_config):
    if self.config._attn_implementation != NAME:
        return _original_compiled_call(self, compile_config)
    return DecodeGraphs(self, fallback=functools.partial(_original_compiled_call, self, compile_config),
                        compile_config=compile_config)


@functools.wraps(_original_sample)
def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
            streamer=None, **model_kwargs):
    cache = model_kwargs.get(CACHE_NAME)
    if not (isinstance(cache, PagedCache) and self._valid_auto_compile_criteria(model_kwargs, generation_config)):
        return _original_sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                                streamer, **model_kwargs)
    reason = (decoding.why_not_compiled(self, logits_processor, generation_config, synced_gpus, model_kwargs)
              or why_not_graphed(self, cache, input_ids.device))
    if reason is not None:
        warn_once(f"generate() decodes in transformers' loop, not in hf_flash's compiled steps: {reason}")
        return _original_sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                                streamer, **model_kwargs)
    return decoding.sample(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                           model_kwargs)


# (owner, name, original, wrapper, the parameters the wrapper relies on, what is lost without it)
_PATCHES = [
    (GenerationMixin, "generate", _original_generate, generate, (),
     "generate() on a caller's PagedCache is no transaction (a failed call leaves the steps before the failure)"),
    (GenerationMixin, "_prepare_cache_for_generation", _original_prepare_cache, _prepare_cache_for_generation,
     ("generation_config", "model_kwargs", "batch_size", "max_cache_length"),
     "generate() runs hf_flash models on transformers' DynamicCache: no PagedCache, CUDA graphs or chunked prefill"),
    (GenerationMixin, "_prefill", _original_prefill, _prefill, ("input_ids", "generation_config", "model_kwargs"),
     "long prompts are prefilled whole, not in chunks"),
    (GenerationMixin, "_valid_auto_compile_criteria", _original_compile_criteria, _valid_auto_compile_criteria,
     ("model_kwargs", "generation_config"), "decode steps over a PagedCache are not replayed as CUDA graphs"),
    (GenerationMixin, "_sample", _original_sample, _sample,
     ("input_ids", "logits_processor", "stopping_criteria", "generation_config", "synced_gpus", "streamer"),
     "greedy search and sampling over a PagedCache run transformers' loop (graphed forwards, token choice eager)"),
    (PreTrainedModel, "get_compiled_call", _original_compiled_call, get_compiled_call, ("compile_config",),
     "decode steps over a PagedCache are not replayed as CUDA graphs"),
]


# What hf_flash's decode loop calls besides the method it replaces.
_LOOP_INTERNALS = [
    (GenerationMixin, "_prefill", ("input_ids", "generation_config", "model_kwargs", "is_first_iteration")),
    (GenerationMixin, "_optimize_model_for_decode", ())]


def apply():
    """Install the wrappers whose internals this transformers release has (idempotent); say what is off otherwise."""
    for owner, name, original, wrapper, parameters, consequence in _PATCHES:
        needed = [(owner, name, parameters)] + (_LOOP_INTERNALS if wrapper is _sample else [])
        if all(has(o, n, p, consequence=consequence) for o, n, p in needed):
            setattr(owner, name, wrapper)


def revert():
    """Give ``generate()`` back transformers' own behaviour."""
    for owner, name, original, *_ in _PATCHES:
        setattr(owner, name, original)

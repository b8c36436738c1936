"""``generate()`` uses a ``PagedCache`` by default for models whose attention implementation is ``"hf_flash"``.

transformers has no registry of cache implementations, so we wrap ``GenerationMixin._prepare_cache_for_generation``:
after it has made its default ``DynamicCache`` (the caller passed no cache and no ``cache_implementation``), we
swap in a ``PagedCache`` sized for this call (batch x beams x max length), so it never runs out and holds about the
tokens actually generated.
"""
import functools
import inspect

from transformers import DynamicCache
from transformers.generation.utils import GenerationMixin

from ..cache import PagedCache

_original = GenerationMixin._prepare_cache_for_generation
_signature = inspect.signature(_original)


@functools.wraps(_original)
def _prepare_cache_for_generation(self, *args, **kwargs):
    result = _original(self, *args, **kwargs)
    bound = _signature.bind(self, *args, **kwargs)
    config, model_kwargs = bound.arguments["generation_config"], bound.arguments["model_kwargs"]
    cache = model_kwargs.get("past_key_values")
    if (type(cache) is DynamicCache and config.cache_implementation is None and not self.config.is_encoder_decoder
            and self.config._attn_implementation == "hf_flash"):
        copies = max(config.num_beams or 1, config.num_return_sequences or 1)
        sequences = bound.arguments["batch_size"] * copies
        page_size = 16
        pages_per_sequence = -(-bound.arguments["max_cache_length"] // page_size)
        # grow: an assistant model's cache is made for its first candidate round only, and later rounds reuse it.
        model_kwargs["past_key_values"] = PagedCache(self.config, page_size=page_size, grow=True,
                                                     num_pages=sequences * (pages_per_sequence + 1))
    return result


def apply():
    """Install the wrapper (idempotent)."""
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation


def revert():
    """Give ``generate()`` back transformers' own default cache."""
    GenerationMixin._prepare_cache_for_generation = _original

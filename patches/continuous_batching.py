"""``ContinuousMixin.init_continuous_batching`` (what ``generate_batch`` and ``continuous_batching_context_manager``
call) for ``"hf_flash"`` on a GPU: continuous batching without transformers' asynchronous double-buffering, unless the
caller sets ``use_async_batching`` itself.

transformers turns that mode on, with CUDA graphs, for every implementation that needs no attention mask (the
flash-named ones, hf_flash among them), and never for sdpa or eager. On the H200 with transformers 5.17 that mode
returned wrong tokens for a request (shifted by a step, or continued from another request's context) in 12 of 288
runs of the continuous-batching test with hf_flash's kernel, whose outputs matched a float32 PyTorch attention to 1e-7
inside the same graphs, and in 11 of 192 with that PyTorch attention in the kernel's place; with the mode off, in none
of 288 (BENCHMARKS.md, 2026-12-04). So hf_flash leaves it off, and says so once.
"""
import copy
import functools

from transformers import ContinuousBatchingConfig
from transformers.generation import ContinuousMixin

from .. import internals
from ..integration import asks_for_hf_flash

_original_init = ContinuousMixin.init_continuous_batching


@functools.wraps(_original_init)
def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, *args, **kwargs):
    if asks_for_hf_flash(self.config._attn_implementation) and self.device.type == "cuda":
        # The caller's config, or the one its GenerationConfig carries (deprecated), as transformers reads it.
        given = continuous_batching_config
        if given is None:
            given = getattr(generation_config or self.generation_config, "continuous_batching_config", None)
        batching = copy.deepcopy(given if isinstance(given, ContinuousBatchingConfig) else ContinuousBatchingConfig())
        # Left unset: off (a release without the option has no attribute, and nothing to turn off).
        if getattr(batching, "use_async_batching", False) is None:
            batching.use_async_batching = False
            internals.warn_once("continuous batching runs without transformers' asynchronous double-buffering, which "
                                "returned wrong tokens on a GPU with any mask-free attention (transformers 5.17); "
                                "set ContinuousBatchingConfig(use_async_batching=True) to have it anyway")
        continuous_batching_config = batching
    return _original_init(self, generation_config, continuous_batching_config, *args, **kwargs)


def apply():
    """Install the default (idempotent); left out, and said once, where the method no longer takes the config."""
    if internals.has(ContinuousMixin, "init_continuous_batching", ["generation_config", "continuous_batching_config"],
                     consequence="continuous batching keeps transformers' asynchronous double-buffering on a GPU, "
                                 "which returned wrong tokens with mask-free attention in 5.17"):
        ContinuousMixin.init_continuous_batching = init_continuous_batching


def revert():
    ContinuousMixin.init_continuous_batching = _original_init

"""``PreTrainedModel._check_and_adjust_attn_implementation`` for ``"hf_flash"``: refuse, with a message naming what
to use, a model that transformers does not run with flash attention, and one that lists the flash kernels it works
with (``_compatible_flash_implementations``).

transformers refuses ``flash_attention_2`` for a model whose ``_supports_flash_attn`` is False (Gemma 3's and Llama
4's multimodal models, whose image tokens attend both ways, and others): its masks are more than the causal,
sliding-window and padding masks that flash kernels apply. It checks only the ``flash_attention_*`` names, so asked
for "hf_flash" such a model would load and silently attend causally. The models that list kernels (GPT-OSS and a few
others, all with attention sinks, which hf_flash does not implement yet) get any other flash-named implementation
replaced by the first kernel of their list, a Hub kernel: asked for "hf_flash", they would run another library's
attention, or fail on that library's missing package with a message that never names hf_flash.
"""
import functools

from transformers import PreTrainedModel

from ..integration import NAME, asks_for_hf_flash

_original_check = PreTrainedModel._check_and_adjust_attn_implementation


@functools.wraps(_original_check)
def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
    listed = getattr(self, "_compatible_flash_implementations", None)
    instead = "sdpa" if getattr(self, "_supports_sdpa", False) else "eager"
    if asks_for_hf_flash(attn_implementation) and not getattr(self, "_supports_flash_attn", False):
        raise ValueError(
            f"{type(self).__name__} does not run with flash attention in transformers: its attention masks are more "
            f"than the causal, sliding-window and padding masks that hf_flash's kernels apply (bidirectional over "
            f"image tokens, say). Load it with attn_implementation='{instead}'.")
    if asks_for_hf_flash(attn_implementation) and listed is not None and NAME not in listed:
        raise ValueError(
            f"{type(self).__name__} works only with the flash kernels it lists ({', '.join(listed)}), and transformers "
            f"would silently swap one of them in for hf_flash; the models that list kernels use attention sinks, which "
            f"hf_flash does not implement yet. Load it with attn_implementation='{instead}'.")
    return _original_check(self, attn_implementation, *args, **kwargs)


def apply():
    """Install the check (idempotent)."""
    PreTrainedModel._check_and_adjust_attn_implementation = _check_and_adjust_attn_implementation


def revert():
    PreTrainedModel._check_and_adjust_attn_implementation = _original_check

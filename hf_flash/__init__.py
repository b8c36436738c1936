"""hf_flash: tiled Triton attention and a paged KV cache for Hugging Face Transformers.

``import hf_flash`` registers the attention implementation ``"hf_flash"``; then
``AutoModelForCausalLM.from_pretrained(name, attn_implementation="hf_flash")`` runs every forward, generate and
perplexity pass through hf_flash's kernels.
"""
from . import integration, patches
from .cache import PagedCache
from .ops import attention, attention_varlen, attention_with_kvcache, merge_state, write_kv_pages
from .pages import PoolExhaustedError
from .patches.generate import release_kept_pools

__version__ = "0.1.0"
__all__ = ["PagedCache", "PoolExhaustedError", "__version__", "attention", "attention_varlen", "attention_with_kvcache",
           "merge_state", "register", "release_kept_pools", "write_kv_pages"]


def register():
    """Make ``attn_implementation="hf_flash"`` loadable: the attention and mask functions under our name, and the
    patches of transformers' internals (idempotent; ``hf_flash.patches.revert()`` takes the patches back)."""
    integration.register()
    patches.apply()


register()

"""Patches of transformers' private internals, installed as ``hf_flash.patches``: each is small, named after what it
patches, checked against the running transformers release when applied (``hf_flash.internals``) and undoable. They sit
above the glue (``hf_flash.integration``, which uses only transformers' public registries) and import from it.

* ``flash_loader``: transformers' flash-attention loader answers ``"hf_flash"`` with hf_flash's functions.
* ``attn_implementation``: models that list their own flash kernels refuse ``"hf_flash"`` with a clear error.
* ``generate``: ``generate()`` on a ``PagedCache`` by default, chunked prefill, CUDA-graph decode, transactions.
* ``continuous_batching``: ``generate_batch`` on a GPU without transformers' asynchronous double-buffering.
"""
if __name__ != "hf_flash.patches":
    # From the repository root (python -m pytest, python -c there) this folder is on sys.path as a top-level
    # `patches`, a name that is not ours to take; nothing probes for it the way transformers probes for `kernels`.
    raise ImportError(f"this {__name__!r} is hf_flash's patches/ folder seen from the repository root; "
                      "import hf_flash.patches", name=__name__)

import importlib

_MODULES = ("flash_loader", "attn_implementation", "generate", "continuous_batching")


def apply():
    """Install every patch (idempotent)."""
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}").apply()


def revert():
    """Give transformers back its own behaviour."""
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}").revert()

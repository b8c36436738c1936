"""Model-level patches, installed as ``hf_flash.patches``: each is small, named after what it patches, undoable."""
if __name__ != "hf_flash.patches":
    # From the repository root (python -m pytest, python -c there) this folder is on sys.path as a top-level
    # `patches`, a name that is not ours to take; nothing probes for it the way transformers probes for `kernels`.
    raise ImportError(f"this {__name__!r} is hf_flash's patches/ folder seen from the repository root; "
                      "import hf_flash.patches", name=__name__)

NAME = "hf_flash"  # the attn_implementation users ask for


def asks_for_hf_flash(implementation):
    """Whether an ``attn_implementation`` is ours; transformers before 5.23 prefixes "paged|" for continuous
    batching."""
    return isinstance(implementation, str) and implementation.removeprefix("paged|") == NAME

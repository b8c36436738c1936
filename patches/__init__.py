"""Model-level patches, installed as ``hf_flash.patches``: each is small, named after what it patches, undoable."""

NAME = "hf_flash"  # the attn_implementation users ask for


def asks_for_hf_flash(implementation):
    """Whether an ``attn_implementation`` is ours; transformers before 5.23 prefixes "paged|" for continuous
    batching."""
    return isinstance(implementation, str) and implementation.removeprefix("paged|") == NAME

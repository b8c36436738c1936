"""Model-level patches, installed as ``hf_flash.patches``: each is small, named after what it patches, undoable."""

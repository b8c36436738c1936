"""The transformers internals hf_flash relies on (``hf_flash.patches``, and the cache's name in ``hf_flash.graphs``),
each checked when its patch is applied.

Private methods move between releases (5.24 renamed the cache argument of ``forward()``/``generate()``, its key in
``generate()``'s model kwargs and the field of model outputs from ``past_key_values`` to ``cache``). A patch whose
internal is missing, or no longer takes the arguments it wraps, is not applied, and transformers' logger says once what
hf_flash cannot do because of it: never silently off.
"""
import inspect

from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

logger = logging.get_logger("hf_flash")

# What forward(), generate()'s model kwargs and model outputs call the cache (a public field of the outputs).
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def warn_once(message):
    logger.warning_once(f"hf_flash: {message}")


def has(owner, name, parameters, *, consequence):
    """Whether ``owner.name`` exists and takes ``parameters`` (names, in any order); if not, say once what hf_flash
    cannot do (``consequence``) and return False."""
    function = getattr(owner, name, None)
    found = set(inspect.signature(function).parameters) if callable(function) else set()
    missing = [p for p in parameters if p not in found]
    if function is None or missing:
        what = "is missing" if function is None else f"no longer takes {', '.join(missing)}"
        warn_once(f"transformers' {getattr(owner, '__name__', owner)}.{name} {what} in this release, so {consequence}. "
                  f"Please report this with your transformers version.")
        return False
    return True

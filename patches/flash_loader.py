"""transformers' flash-attention loader (``modeling_flash_attention_utils._lazy_imports``), answered for
``"hf_flash"``.

transformers treats every ``attn_implementation`` whose name contains "flash" as a flash-attn request: it loads that
implementation's ``flash_attn_func`` / ``flash_attn_varlen_func`` through this private hook and fails for any name it
does not know. Wrapped, the hook serves hf_flash's flash-attn-compatible functions (``hf_flash.integration``) for our
name and defers to transformers for every other, so transformers' own flash path (unpadding to varlen, packed
sequences, sliding window, soft-cap) runs hf_flash's kernels. The same path logs "Casting fp32 inputs back to
torch.float32 for flash-attn compatibility" for every fp32 model, a cast that does nothing: that one line is filtered.
"""
import logging

import transformers.modeling_flash_attention_utils as flash_utils

from ..integration import asks_for_hf_flash, flash_attn_func, flash_attn_varlen_func
from ..internals import has

_original_lazy_imports = getattr(flash_utils, "_lazy_imports", None)


def _lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
    """Serve hf_flash's functions for our name; defer to transformers for every other implementation."""
    if asks_for_hf_flash(implementation):
        # No flash_attn_with_kvcache: transformers only uses it for names matching "flash.*[23]".
        return flash_attn_func, flash_attn_varlen_func, None, flash_utils._pad_input, flash_utils._unpad_input
    return _original_lazy_imports(implementation, attention_wrapper, allow_all_kernels=allow_all_kernels)


class _NoOpCastMessage(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith("Casting fp32 inputs back to torch.float32")


_no_op_cast_message = _NoOpCastMessage()
_flash_logger = logging.getLogger(flash_utils.__name__)


def apply():
    """Install the hook and the log filter (idempotent)."""
    if has(flash_utils, "_lazy_imports", ("implementation", "attention_wrapper", "allow_all_kernels"),
           consequence="from_pretrained(..., attn_implementation='hf_flash') fails: transformers looks for flash-attn"):
        flash_utils._lazy_imports = _lazy_imports
    _flash_logger.addFilter(_no_op_cast_message)  # a set of filters: adding twice keeps one


def revert():
    flash_utils._lazy_imports = _original_lazy_imports
    _flash_logger.removeFilter(_no_op_cast_message)

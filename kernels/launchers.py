"""The Triton launchers under the names of ``hf_flash.torch_backend``: what ``hf_flash.kernels.backend()`` returns. A
module, like the torch path, because torch.compile traces ``choose_num_splits`` through it (it cannot trace a namespace
object built at each call)."""
from .decode import choose_num_splits, paged_decode, program_slots
from .merge import merge_state
from .paged_kv import append_pages, write_pages
from .prefill import prefill

__all__ = ["append_pages", "choose_num_splits", "merge_state", "paged_decode", "prefill", "program_slots",
           "write_pages"]

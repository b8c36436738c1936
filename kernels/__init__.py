"""Triton kernels of hf_flash, installed as ``hf_flash.kernels``.

One kernel family per module; each module holds its ``@triton.jit`` code and a launcher that only allocates
scratch, computes the grid and launches (``prefill_sm90``, the Hopper prefill in Gluon, is reached through
``prefill``'s launcher). ``softmax_state`` has no launcher: it holds the online-softmax steps that
prefill and decode share; ``paged_kv`` holds, beside its page-write kernel, the page-id and K/V-tile loads they share.
No transformers import here; validation lives in ``hf_flash.ops``.

Shared conventions (the torch path in ``hf_flash.torch_backend`` implements the same launchers):

* Token tensors, outputs included, are 4-D ``[B, S, H, D]`` with a unit last stride and any other strides. A
  packed (varlen) tensor ``[T, H, D]`` is passed as ``t.unsqueeze(0)``, ``[1, T, H, D]``: a batch of 1 is shared
  by every sequence (the launchers give it batch stride 0), and the per-sequence ``*_start`` offsets select its
  rows; the lse ``[B, H, S]`` likewise. The batch size is ``len(q_len)``. No tensor is a stride-0 expanded view:
  outputs written through one break ``torch.compile`` (and overlap in memory).
* Sequence ``b`` owns rows ``start[b] .. start[b] + len[b] - 1`` of its batch entry; ``*_start`` / ``*_len``
  are int32 ``[B]`` tensors on the tensors' device.
* Causal masking is aligned bottom-right: query ``i`` of a sequence sees key ``j`` iff
  ``j <= i + k_len - q_len`` (plus ``window_right``), and ``j >= i + k_len - q_len - window_left`` when
  ``window_left >= 0``. ``-1`` means an unbounded side.
* Soft-capping (``softcap > 0``): ``s = softcap * tanh(s_raw * softmax_scale / softcap)`` before masking.
* Log-sum-exp is natural-log, float32; a row that sees no key gets output 0 and lse ``-inf``. NaN or inf in the
  queries, keys or values a row sees reach its output and lse (NaN), as in SDPA; hidden keys reach nothing,
  except that a NaN or inf value of a masked key reaches the other rows of its tile that see a key, through
  ``0 * NaN`` in ``P @ V`` (as in SDPA).
* Block tables, lengths and slots are trusted: ``hf_flash.ops`` has checked them (or its caller vouched).
* Paged K/V: pools ``[num_pages, page_size, H_kv, D]``, ``block_table`` int32 ``[B, max_pages]``;
  logical key ``j`` of sequence ``b`` lives in page ``block_table[b, j // page_size]`` at row
  ``j % page_size``.
"""
import functools
import logging
import os

# Ahead of the stand-in below: a first import of torch looks up `__file__` on every loaded module, which would take
# the stand-in out of sys.modules while it is still being imported.
import torch
import triton

if __name__ != "hf_flash.kernels":
    # Loaded as a top-level `kernels`: from the repository root (python -m pytest, python -c there) this folder sits
    # on sys.path, ahead of site-packages, under the name of Hugging Face's kernel hub. transformers imports the hub
    # (5.25 and newer require it and import it with the model code; 5.17 to 5.24 probe for it without catching
    # ImportError), so this folder must never hide it. With the hub installed, the hub itself is loaded in this
    # module's place. Without it, this copy is a stand-in: without file and version it reads as "not installed" to
    # transformers, and it leaves sys.modules at the first name looked up that it lacks (the probe's `__version__`),
    # so no top-level `kernels` stays behind.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _repository = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _hub = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _repository])
    if _hub is not None:
        # `import` hands out what sys.modules holds once this body has run: the hub's module.
        _module = _util.module_from_spec(_hub)
        _sys.modules[__name__] = _module
        try:
            _hub.loader.exec_module(_module)
        except BaseException:
            del _sys.modules[__name__]
            raise
    else:
        del __file__

        def __getattr__(name):
            if getattr(_sys.modules.get(__name__), "__dict__", None) is globals():
                del _sys.modules[__name__]
            raise AttributeError(f"no {name!r}: this {__name__!r} is hf_flash's kernels/ folder seen from the "
                                 "repository root, not Hugging Face's kernel hub; import hf_flash.kernels")

# The Triton interpreter computes bf16 ``tl.dot`` wrongly (triton 3.9); kernels upcast their dot operands to
# fp32 when this is set. Read once: ``triton.jit`` also reads the variable only at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_dim_bucket(head_dim):
    """The row of the kernels' tables (tile configs, split floors) for ``head_dim``: its padded tile width, a power
    of two; head dims <= 64 share the 64 row."""
    return max(64, 1 << (head_dim - 1).bit_length())


def dot_extent(size):
    """The padded size of a ``tl.dot`` operand's dimension of ``size``: the next power of two, and at least 16, the
    least that tl.dot takes."""
    return max(16, 1 << (size - 1).bit_length())


@functools.cache
def _device_properties(index):
    return torch.cuda.get_device_properties(index)


def device_properties(device):
    """``torch.cuda.get_device_properties(device)``, read once per GPU: a read costs ~4 us (H100 host), and a launch
    asks up to three times (capability, SM count)."""
    return _device_properties(torch.cuda.current_device() if device.index is None else device.index)


def tile_config(configs, interpret_config, head_dim, dtype, device):
    """A kernel's tile config from its ``CONFIGS`` table, keyed by (``head_dim_bucket``, fp32 inputs, GPU major
    version); a GPU generation without a row gets sm80's. Under the interpreter: its ``interpret_config``."""
    if INTERPRET:
        return interpret_config
    fp32, bucket = dtype == torch.float32, head_dim_bucket(head_dim)
    major = device_properties(device).major
    return configs.get((bucket, fp32, major), configs[(bucket, fp32, 8)])


def dependent_launch(device):
    """Whether hf_flash's kernels launched now on ``device`` use programmatic dependent launch: on Hopper and newer
    (not the interpreter), inside CUDA-graph capture (the decode step: some 180 short kernels at a batch of one).
    Each kernel is then scheduled while the one before it finishes and waits in ``gdc_wait`` for its stores. Eager
    launches keep stream order: with PDL they made the host-bound batch-one prefill slower on the H200 (1B-shaped
    1 x 512: 20 -> 30 ms, BENCHMARKS.md 2026-12-04)."""
    # capture first: eager launches (the prefill's page writes) stop at it without asking for the device's properties
    return (device.type == "cuda" and not INTERPRET and torch.cuda.is_current_stream_capturing()
            and device_properties(device).major >= 9)


TMA_ALIGN = 16  # bytes: TMA's rule for a tensor map's base address and every stride but the last


def batch_stride(t):
    """A batch of 1 is shared by every sequence (packed varlen): stride 0 makes each sequence's entry the same."""
    return 0 if t.shape[0] == 1 else t.stride(0)


def tma_aligned(t, strides):
    """Whether a tensor map may cover ``t`` with these element ``strides`` (all but the last dimension's): a unit last
    stride, and a base address and strides in bytes that are multiples of ``TMA_ALIGN``."""
    return (t.stride(-1) == 1 and t.data_ptr() % TMA_ALIGN == 0
            and all(s * t.element_size() % TMA_ALIGN == 0 for s in strides))


def _int_class(value):
    """What Triton specializes an int argument on: 1 (a constant), divisibility by 16, and its width."""
    return value == 1, value % 16 == 0, -2**31 <= value < 2**31, value < 2**63


def _arg_class(arg):
    """An argument's part of a launch's key: what Triton specializes it on, or finer (None: not to be cached)."""
    kind = type(arg)
    if kind is int:
        return _int_class(arg)
    if kind is float or kind is bool or arg is None:
        return kind, arg if kind is bool else None
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if hasattr(arg, "block_shape"):  # a host tensor descriptor (Triton's or Gluon's): Triton 3.6-3.9 specialize on
        # its dtype, block shape and layout; its shape and strides are runtime arguments (a tensor map's)
        return (kind, arg.base.dtype, arg.base.data_ptr() % 16 == 0, tuple(arg.block_shape),
                getattr(arg, "layout", None), arg.padding)
    return None


# Compile options of every launch. Fused multiply-adds are what the kernels' arithmetic is written for (the softmax's
# exp2(s * scale - m) is one fma a score). Triton 3.9 fuses unless told otherwise and warns that 3.10 will not.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

_COMPILED = {}  # launch key -> (compiled kernel, the kernel's parameters after the positional arguments)
_COMPILED_MAX = 512  # keys differ only by specialization classes, dtypes and constants: a few per kernel in use
# Tests set this: every cached launch then asks Triton's own binder which kernel it picks and fails if another.
verify_cached_launches = False


@functools.cache
def _say_not_cached(name, kind):
    logging.getLogger("hf_flash").warning(
        "hf_flash: %s launches through Triton's full JIT path: an argument of type %s has no launch key", name, kind)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with Triton's per-call binding skipped where an earlier launch had the same
    key: the kernel, device, constants and options, Triton's debug knob, and each argument's specialization class
    (``_arg_class``). On an H100 (2026-12-07, ``benchmarks/h100/launch_breakdown_20261206.py``) it took the Gluon
    prefill launcher's host time per call from 117 to 93 us and ``hf_flash.attention``'s from 186 to 171 us (cuDNN
    SDPA's: 63 us on that host); the compiled kernel's own launcher (``CompiledKernel[grid]``) still encodes the
    tensor maps and scratch. Compiles, compile errors and the interpreter take the JIT path. Runtime arguments go
    positionally: keyword values (constants, options, ``COMPILE_OPTIONS`` unless given) enter the key as they are."""
    kwargs = COMPILE_OPTIONS | kwargs
    if INTERPRET:
        return kernel[grid](*args, **kwargs)
    classes = tuple(map(_arg_class, args))
    key = None
    if None in classes:
        _say_not_cached(kernel.fn.__name__, type(args[classes.index(None)]).__name__)
    else:
        key = kernel, torch.cuda.current_device(), classes, tuple(kwargs.items()), triton.knobs.runtime.debug
    cached = _COMPILED.get(key) if key is not None else None
    if cached is None:
        compiled = kernel[grid](*args, **kwargs)
        if key is not None:
            if len(_COMPILED) >= _COMPILED_MAX:
                _COMPILED.clear()
            _COMPILED[key] = compiled, [(p.name, p.default) for p in kernel.params[len(args):]]
        return compiled
    compiled, rest = cached
    if verify_cached_launches and kernel.warmup(*args, grid=grid, **kwargs) is not compiled:
        raise AssertionError(f"{kernel.fn.__name__}: the cached launch's kernel is not the one Triton binds")
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *(kwargs.get(name, default) for name, default in rest))
    return compiled


def clear_compiled(kernel):
    """Drops ``kernel``'s compiled kernels, Triton's and the cached launches holding them: its next launch compiles."""
    kernel.device_caches.clear()
    for key in [key for key in _COMPILED if key[0] is kernel]:
        del _COMPILED[key]


def backend():
    """The launchers as one module with the same names as ``hf_flash.torch_backend``."""
    from . import launchers

    return launchers

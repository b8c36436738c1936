"""hf_flash's functional API, with the argument names flash-attn users know.

Every function validates its inputs (a ``ValueError`` naming the argument, never a CUDA crash, raised before anything
is written or launched), brings them into the launchers' common form (see ``hf_flash.kernels``) and dispatches by
device: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run the Triton kernels, anything else runs
``hf_flash.torch_backend``.

Values held on the device (offsets, lengths, the page ids a call uses, slots) are checked on the host, all of a call's
together in one read: at most one host sync per call. Some calls read none of them and the caller vouches for them, as
flash-attn (which checks none) lets every caller do: calls during CUDA-graph capture, where nothing can be read; calls
traced by ``torch.compile`` (``torch.compiler.is_compiling()``), where a read would break the graph; and
``attention_with_kvcache`` given ``max_seqlen_k`` with unpacked ``q`` (hf_flash's own decode step, whose ``PagedCache``
keeps lengths and block table on the host and checks them there). Where nothing is read, a missing ``max_seqlen_q``
(and ``attention_varlen``'s ``max_seqlen_k``) is the packed tensor's length, which bounds it; ``attention_with_kvcache``
needs ``max_seqlen_k``.

The kernels run as custom ops (``torch.ops.hf_flash.prefill``, ``paged_decode``, ``merge_state``, ``write_pages``,
``append_pages``), which torch.compile keeps whole in its graphs; eager calls on plain tensors skip the dispatcher
(``_launcher_op``).

Causal masks are aligned to the bottom-right corner when ``q_len != k_len``; with ``seqlen_q = 2`` and
``seqlen_k = 5`` (1 = keep)::

    1 1 1 1 0
    1 1 1 1 1
"""
import contextlib
import functools
import itertools
import math
import numbers
import operator
import os
from typing import Optional

import torch

from . import torch_backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernels take softmax_scale and softcap times log2(e) (their exp2 domain), and softmax_scale / softcap, as float32
# scalars: past these bounds they are inf there.
_FP32_MAX = torch.finfo(torch.float32).max
_SCALE_MAX = _FP32_MAX / math.log2(math.e)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INT32_MAX = torch.iinfo(torch.int32).max  # lengths and offsets are int32 on the device
MAX_NUM_SPLITS = 128  # as in flash-attn; the grid's second dimension holds the splits
_forced_backend = None


@contextlib.contextmanager
def use_backend(name):
    """Force ``"triton"`` or ``"torch"`` for every call inside the block (tests, benchmarks)."""
    global _forced_backend
    if name not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {name!r}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def _backend(device):
    """The module whose launchers run on ``device``: Triton kernels or the torch path."""
    name = _forced_backend or ("triton" if device.type == "cuda" or _INTERPRET else "torch")
    if name == "torch":
        return torch_backend
    from . import kernels  # imported lazily: triton.jit reads TRITON_INTERPRET when it decorates

    return kernels.backend()


# ----------------------------------------------------------------------------------- the launchers as custom ops
# Each launcher is one operator of the ``hf_flash`` library (``torch.ops.hf_flash.<name>``), so torch.compile traces
# the validation above it but keeps the launch opaque: the torch path's host reads and the Triton launches stay out of
# dynamo's way (no graph break). Each op writes tensors it is given (its schema marks them mutable) and returns
# nothing; its body picks the backend when it runs, as ``_backend`` does eagerly, so ``use_backend`` reaches compiled
# graphs too. Not torch.library.custom_op: its Python autograd and in-place kernels cost ~20 us per call in eager (a
# decode step makes two calls per layer); one CompositeExplicitAutograd kernel gets torch's C++ fallbacks. Even so the
# dispatcher's round trip into Python costs ~15 us a prefill call (H100 host, 2026-12-06), so eager calls skip it where
# nothing would see the op (``_through_dispatcher``).
_LIBRARY = torch.library.Library("hf_flash", "DEF")


def _writes_in_place(*args, **kwargs):
    """The launchers' fake implementation: they return nothing and change no tensor's shape, so under fake tensors
    (torch.compile's tracing) there is nothing to do."""


# How many TorchDispatchModes are active, infrastructure modes (FakeTensorMode, make_fx's proxy mode) included: private
# to torch (2.0 to 2.13 at least; tests/test_custom_ops.py checks it is there). Without it every call takes the op.
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def _through_dispatcher(first):
    """Whether a launcher call whose first tensor is ``first`` must go through its op: while torch.compile traces, for
    tensor subclasses (fake, functional) and under any TorchDispatchMode (make_fx's proxy mode sees plain tensors)."""
    return torch.compiler.is_compiling() or type(first) is not torch.Tensor or _dispatch_modes() > 0


def _launcher_op(name, mutates_args):
    """Define the annotated function it decorates as the op ``hf_flash::<name>``, for every device; return what the
    API calls: the function itself where nothing but eager torch would see the op, else the op."""

    def define(fn):
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"hf_flash::{name}", _writes_in_place, lib=_LIBRARY)
        op = getattr(torch.ops.hf_flash, name)

        @functools.wraps(fn)
        def launch(first, *args, **kwargs):
            return (op if _through_dispatcher(first) else fn)(first, *args, **kwargs)

        return launch

    return define


# Schemas take no kwarg-only tensors: ``block_table`` is positional here.
@_launcher_op("prefill", mutates_args=("out", "lse"))
def _prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
                block_table: Optional[torch.Tensor], max_seqlen_q: int, *, softmax_scale: float, causal: bool,
                window_left: int, window_right: int, softcap: float) -> None:
    _backend(q.device).prefill(q, k, v, out, lse, q_start, q_len, k_start, k_len, max_seqlen_q,
                               softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                               window_right=window_right, softcap=softcap, block_table=block_table)


@_launcher_op("paged_decode", mutates_args=("out", "lse"))
def _paged_decode_op(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                     seqlens: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *, softmax_scale: float,
                     window_left: int, softcap: float, num_splits: int) -> None:
    _backend(q.device).paged_decode(q, k_pool, v_pool, block_table, seqlens, out, lse, softmax_scale=softmax_scale,
                                    window_left=window_left, softcap=softcap, num_splits=num_splits)


@_launcher_op("merge_state", mutates_args=("out", "lse"))
def _merge_state_op(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor) -> None:
    _backend(out.device).merge_state(out_a, lse_a, out_b, lse_b, out, lse)


@_launcher_op("append_pages", mutates_args=("k_pool", "v_pool"))
def _append_pages_op(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     block_table: torch.Tensor, cache_seqlens: torch.Tensor, q_start: Optional[torch.Tensor]) -> None:
    _backend(k_pool.device).append_pages(k_new, v_new, k_pool, v_pool, block_table, cache_seqlens, q_start)


@_launcher_op("write_pages", mutates_args=("k_pool", "v_pool"))
def _write_pages_op(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    _backend(k_pool.device).write_pages(k_new, v_new, k_pool, v_pool, slot_mapping)


# ----------------------------------------------------------------------------------------------- validation


def _check_tensor(name, t, ndim, *, dtypes=_DTYPES, in_place=False):
    """Type, rank and dtype of ``t``; returns it with a unit last stride (copying unless it is written in place)."""
    if not isinstance(t, torch.Tensor):  # ValueError like every other bad argument, as the API promises
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    if in_place:
        raise ValueError(f"{name} must have a contiguous last dimension (it is updated in place)")
    return t.contiguous()


def _check_qkv(q, k, v, *, batch_dims, names=("k", "v")):
    """Checks shared by every entry point; returns q, k, v with a unit last stride. ``names`` are the caller's
    names for ``k`` and ``v`` (``k_cache``/``v_cache`` for a cache)."""
    kn, vn = names
    q = _check_tensor("q", q, batch_dims + 2)
    k = _check_tensor(kn, k, batch_dims + 2)
    v = _check_tensor(vn, v, batch_dims + 2)
    for name, t in ((kn, k), (vn, v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must match")
    if k.shape != v.shape:
        raise ValueError(f"{kn} and {vn} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if not 0 < head_dim <= 256 or head_dim % 8 != 0:
        raise ValueError(f"q's head dim must be a multiple of 8 from 8 to 256, got {head_dim}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"{kn}'s head dim {k.shape[-1]} differs from q's {head_dim}")
    for name, t in (("q", q), (kn, k)):
        if t.shape[-2] == 0:
            raise ValueError(f"{name} has no heads: shape {tuple(t.shape)}")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"q's {q.shape[-2]} heads are not a multiple of {kn}'s {k.shape[-2]} heads (GQA groups)")
    return q, k, v


def _is_number(x):  # numpy's scalars too, as flash-attn takes them; not bools
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_options(softmax_scale, causal, window_size, softcap, head_dim):
    if isinstance(causal, torch.Tensor) or causal not in (True, False):  # a truthy string would silently be causal
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif not (_is_number(softmax_scale) and 0 < softmax_scale <= _SCALE_MAX):  # NaN fails both comparisons
        raise ValueError(f"softmax_scale must be a positive number of at most {_SCALE_MAX:.4g} (its product with "
                         f"log2(e) must be finite in float32), got {softmax_scale!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    if softcap is None:
        softcap = 0.0
    if not (_is_number(softcap) and 0 <= softcap <= _SCALE_MAX
            and (softcap == 0 or softmax_scale <= softcap * _FP32_MAX)):
        raise ValueError(f"softcap must be 0 (off) or a positive number of at most {_SCALE_MAX:.4g} with "
                         f"softmax_scale / softcap finite in float32, got {softcap!r}")
    return float(softmax_scale), bool(causal), (int(window_size[0]), int(window_size[1])), float(softcap)


def _clip_window(window, longest):
    """``window`` with each side of ``longest`` tokens or more (the longest query or key run of the call, or a bound
    of it) made unbounded, -1: the mask is the same, and what reaches the kernels fits their int32 positions."""
    return tuple(-1 if w >= longest else w for w in window)


def _host_reads_forbidden(device):
    """Whether device values must not be read on the host: inside CUDA-graph capture none can be (transformers'
    continuous batching captures its steps, as flash-attn allows), and while torch.compile traces a call a read would
    break its graph. The caller vouches for the offsets, lengths and page ids it passes."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _read_on_host(*tensors):
    """The values of integer or bool tensors (all on one device) as lists, None for None: one host sync for all."""
    given = [t.reshape(-1).long() for t in tensors if t is not None]
    values = iter(torch.cat(given).tolist() if given else ())
    return [None if t is None else list(itertools.islice(values, t.numel())) for t in tensors]


def _check_bound(name, given, derived=None):
    """A caller's host-side length bound: an int >= 0 (ints, numpy ints, 0-d integer tensors on the CPU). Where
    nothing is read (see ``_host_reads_forbidden``) a missing one is ``derived``, the shape that bounds it, or else
    required."""
    if given is None:
        if derived is not None:
            return derived
        raise ValueError(f"{name} must be given during CUDA-graph capture and torch.compile, where the lengths cannot "
                         f"be read")
    if isinstance(given, int):  # as is: index() of a dynamic int would specialize torch.compile's graph to its value
        value = given
    else:
        try:
            value = operator.index(given)
        except TypeError:
            value = -1
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {given!r}")
    return value


def _unit_stride(t):
    """``t`` with a unit last stride: the kernels read offsets, lengths, slots and block-table rows as contiguous
    runs. A strided view (``cu[::2]``) is copied; it is only read."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check_cu_seqlens(name, cu, device):
    """``cu`` must be int32 ``[B+1]`` offsets on ``device`` (``B`` may be 0); returns them with a unit stride and the
    lengths, on the device. Their values are checked by ``_check_cu_seqlens_values`` once read."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.dtype != torch.int32:
        raise ValueError(f"{name} must be a 1-D int32 tensor of batch_size + 1 offsets, got "
                         f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    cu = _unit_stride(cu)
    return cu, cu[1:] - cu[:-1]


def _check_cu_seqlens_values(name, host, total):
    """Offsets read to the host must start at 0, never decrease and end at or before ``total`` (as in flash-attn,
    tokens past the last offset belong to no sequence: static-shape callers such as transformers' continuous
    batching pad the packed tensors); returns the longest sequence and where the last one ends."""
    if host[0] != 0 or any(b < a for a, b in itertools.pairwise(host)):
        shown = f"{host[:8]}{'...' if len(host) > 8 else ''}"
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {shown}")
    if total is not None and host[-1] > total:
        raise ValueError(f"{name} ends at {host[-1]} but the packed tensor has only {total} tokens")
    return max((b - a for a, b in itertools.pairwise(host)), default=0), host[-1]


def _check_lengths(name, lens, batch, device):
    """``lens`` as an int32 ``[batch]`` tensor on ``device`` (unit stride), and its values on the host where they are
    known without a read (an int; else None: a tensor's values are checked once read)."""
    if isinstance(lens, int) and not isinstance(lens, bool):
        if not 0 <= lens <= _INT32_MAX:
            raise ValueError(f"{name} must be from 0 to {_INT32_MAX}, got {lens}")
        return torch.full((batch,), lens, dtype=torch.int32, device=device), [lens] * batch
    if not isinstance(lens, torch.Tensor) or lens.shape != (batch,) or lens.dtype != torch.int32:
        raise ValueError(f"{name} must be an int or an int32 tensor of shape ({batch},), got "
                         f"{getattr(lens, 'dtype', type(lens).__name__)} {tuple(getattr(lens, 'shape', ()))}")
    if lens.device != device:
        raise ValueError(f"{name} is on {lens.device} but q is on {device}")
    return _unit_stride(lens), None


def _check_block_table(block_table, batch, device):
    """Returns ``block_table`` with a unit last stride."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be a 2-D int32 tensor [batch, max_pages], got "
                         f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table has {block_table.shape[0]} rows but the batch has {batch} sequences")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {device}")
    return _unit_stride(block_table)


def _check_page_size(name, pool):
    """A pool's pages (a contiguous cache's rows: one page a sequence) must hold a token at least: the kernels split
    positions by the page size."""
    if pool.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token per page, got shape {tuple(pool.shape)}")


def _foreign_pages(block_table, k_len, pool):
    """Bool ``[batch, max_pages]``, on the device: the entries of ``block_table`` that hold keys ``0 .. k_len[b] - 1``
    of their sequence (the only ones a call reads or writes) but are no page of ``pool``. Entries past a sequence's
    keys may hold anything (vLLM pads with -1)."""
    num_pages, page_size = pool.shape[:2]
    used = torch.arange(block_table.shape[1], device=block_table.device) < (k_len[:, None] + page_size - 1) // page_size
    return used & ((block_table < 0) | (block_table >= num_pages))


def _check_page_ids(block_table, foreign, any_foreign, num_pages):
    """``any_foreign``: ``foreign.any()`` as read on the host. Only the error path reads where (a second sync)."""
    if any_foreign[0]:
        b, j = foreign.nonzero()[0].tolist()
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} holds keys of sequence {b} but is not a "
                         f"page of the pool (0 .. {num_pages - 1})")


# ------------------------------------------------------------------------------------------------ the API


class _NoBackward(torch.autograd.Function):
    """The kernels' outputs, linked to the tensors they were computed from through a node whose backward raises:
    hf_flash has no backward kernels, and without the link a backward pass would stop at the attention unseen."""

    @staticmethod
    def forward(ctx, out, lse, *inputs):
        return out, lse

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("hf_flash's kernels have no backward pass (inference only): compute gradients with "
                                  "attn_implementation='sdpa', or run the forward under torch.no_grad()")


def _results(out, lse, return_lse, *inputs):
    """``out`` (and ``lse``), through ``_NoBackward`` where eager autograd records (grad enabled and an input that
    requires grad; torch.compile sees the custom ops instead, which torch gives no backward either)."""
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in inputs)):
        out, lse = _NoBackward.apply(out, lse, *inputs)
    return (out, lse) if return_lse else out


def _run_prefill(q4, k4, v4, q_start, q_len, k_start, k_len, max_seqlen_q, *, softmax_scale, causal, window,
                 softcap, block_table=None, out=None):
    """Allocate outputs (``out`` unless given) and call the backend's prefill launcher; q4/k4/v4/out are in the
    launchers' 4-D form (batch 1 when packed), and so is the lse, ``[q4's batch, heads, rows]``."""
    batch, rows, heads, _ = q4.shape
    out = torch.empty_like(q4) if out is None else out
    lse = q4.new_empty((batch, heads, rows), dtype=torch.float32)
    _prefill_op(q4, k4, v4, out, lse, q_start, q_len, k_start, k_len, block_table, max_seqlen_q,
                softmax_scale=softmax_scale, causal=causal, window_left=window[0], window_right=window[1],
                softcap=softcap)
    return out, lse


def _dense_lengths(batch, seqlen_q, seqlen_k, device):
    """A padding-free batch's offsets and lengths in the launchers' form: ``(zeros, q_len, k_len)``, int32 ``[batch]``.
    Made once per shape and device (three fills cost ~20 us of host time a call, H100 2026-12-06), except where a
    fill would not run now: under CUDA-graph capture and while torch.compile traces (``_host_reads_forbidden``)."""
    if _host_reads_forbidden(device):
        zeros = torch.zeros(batch, dtype=torch.int32, device=device)
        return zeros, torch.full_like(zeros, seqlen_q), torch.full_like(zeros, seqlen_k)
    return _made_dense_lengths(batch, seqlen_q, seqlen_k, device)


@functools.lru_cache(maxsize=64)
def _made_dense_lengths(batch, seqlen_q, seqlen_k, device):
    # A blocking copy from the host (not a fill on this call's stream): every stream sees the values. Normal tensors,
    # not inference tensors, so that calls in and out of inference mode share them.
    with torch.inference_mode(False):
        rows = torch.tensor([[0] * batch, [seqlen_q] * batch, [seqlen_k] * batch], dtype=torch.int32, device=device)
    return rows.unbind()


def attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              return_softmax_lse=False):
    """Exact attention over a padded-free batch.

    Args:
        q: ``[batch, seqlen_q, nheads, headdim]``, fp16 / bf16 / fp32; any of the sizes may be 0 but the heads and
            head dim.
        k, v: ``[batch, seqlen_k, nheads_k, headdim]``; ``nheads`` must be a multiple of ``nheads_k`` (GQA/MQA).
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: bottom-right aligned causal mask.
        window_size: ``(left, right)`` sliding window; ``-1`` means unbounded.
        softcap: ``softcap * tanh(scores / softcap)`` on the scaled scores; 0 disables it.
        return_softmax_lse: also return the natural-log log-sum-exp ``[batch, nheads, seqlen_q]`` (float32).

    Returns:
        ``out [batch, seqlen_q, nheads, headdim]`` (and the lse). Rows that see no key give 0 (lse ``-inf``); NaN or
        inf in q, k or v give NaN in the rows whose queries see them (and in their lse), as SDPA does.
    """
    q, k, v = _check_qkv(q, k, v, batch_dims=2)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {q.shape[0]}")
    softmax_scale, causal, window, softcap = _check_options(softmax_scale, causal, window_size, softcap,
                                                             q.shape[-1])
    seqlen_q = q.shape[1]
    zeros, q_len, k_len = _dense_lengths(q.shape[0], seqlen_q, k.shape[1], q.device)
    out, lse = _run_prefill(q, k, v, zeros, q_len, zeros, k_len, seqlen_q, softmax_scale=softmax_scale, causal=causal,
                            window=_clip_window(window, max(seqlen_q, k.shape[1])), softcap=softcap)
    return _results(out, lse, return_softmax_lse, q, k, v)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, block_table=None,
                     return_softmax_lse=False):
    """Exact attention over packed variable-length sequences.

    Args:
        q: ``[total_q, nheads, headdim]``, the batch's queries packed back to back.
        k, v: ``[total_k, nheads_k, headdim]``, or page pools ``[num_pages, page_size, nheads_k, headdim]`` when
            ``block_table`` is given.
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]`` offsets (``cu_seqlens_k`` gives the key lengths also
            with pages). As in flash-attn they may end before the packed tensors do: the rows after belong to no
            sequence (their keys are not read, their outputs are 0 and their lse is undefined).
        max_seqlen_q, max_seqlen_k: derived from the offsets, which are checked on the host (with the page ids, in
            one sync). During CUDA-graph capture and torch.compile nothing is read or checked: they are used as given,
            and a missing one is the packed length (``total_q``; ``total_k`` or the block table's capacity), which
            bounds it (a loose ``max_seqlen_q`` only launches programs that find no rows).
        block_table: int32 ``[batch, max_pages]`` page ids of each sequence's keys. The entries holding keys must be
            pages of the pools; the ones past a sequence's keys are never read and may hold anything (-1, say).
        The other arguments are as in ``attention``.

    Returns:
        ``out [total_q, nheads, headdim]`` (and the lse ``[nheads, total_q]`` float32).
    """
    paged = block_table is not None
    q = _check_tensor("q", q, 3)
    k = _check_tensor("k", k, 4 if paged else 3)
    v = _check_tensor("v", v, 4 if paged else 3)
    q, k, v = _check_qkv(q[None], k if paged else k[None], v if paged else v[None], batch_dims=2)
    softmax_scale, causal, window, softcap = _check_options(softmax_scale, causal, window_size, softcap,
                                                             q.shape[-1])
    cu_seqlens_q, q_len = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    cu_seqlens_k, k_len = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if k_len.numel() != q_len.numel():
        raise ValueError(f"cu_seqlens_q describes {q_len.numel()} sequences but cu_seqlens_k {k_len.numel()}")
    batch = q_len.numel()
    if paged:
        block_table = _check_block_table(block_table, batch, q.device)
        _check_page_size("k", k)
    foreign = any_foreign = None
    if _host_reads_forbidden(q.device):  # nothing read: the caller vouches; the packed lengths bound missing bounds
        max_q, q_end = _check_bound("max_seqlen_q", max_seqlen_q, derived=q.shape[1]), None
        max_k = _check_bound("max_seqlen_k", max_seqlen_k, derived=block_table.shape[1] * k.shape[1] if paged
                             else k.shape[1])
    else:  # one host read: both offsets and whether a page id in use is out of range
        foreign = _foreign_pages(block_table, k_len, k) if paged else None
        host_q, host_k, any_foreign = _read_on_host(cu_seqlens_q, cu_seqlens_k, foreign.any() if paged else None)
        max_q, q_end = _check_cu_seqlens_values("cu_seqlens_q", host_q, q.shape[1])
        max_k, _ = _check_cu_seqlens_values("cu_seqlens_k", host_k, None if paged else k.shape[1])
    if paged:
        if max_k > block_table.shape[1] * k.shape[1]:
            raise ValueError(f"cu_seqlens_k asks for {max_k} keys but block_table holds {block_table.shape[1]} pages "
                             f"of {k.shape[1]} tokens")
        if foreign is not None:
            _check_page_ids(block_table, foreign, any_foreign, k.shape[0])
    # Query rows past the last sequence get no attention: zeros keep them finite for the layers after.
    out = torch.empty_like(q[0]) if q_end == q.shape[1] else torch.zeros_like(q[0])
    _, lse = _run_prefill(
        q, k, v, cu_seqlens_q[:-1], q_len, cu_seqlens_k[:-1], k_len, max_q, softmax_scale=softmax_scale,
        causal=causal, window=_clip_window(window, max(max_q, max_k)), softcap=softcap, block_table=block_table,
        out=out[None])
    return _results(out, lse[0], return_softmax_lse, q, k, v)


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table=None, k=None, v=None, *,
                           cu_seqlens_q=None, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
                           causal=False, window_size=(-1, -1), softcap=0.0, num_splits=0, return_softmax_lse=False):
    """Attention of new queries over a KV cache, appending the new keys/values first (flash-attn semantics).

    Args:
        q: ``[batch, seqlen_q, nheads, headdim]``, or packed ``[total_q, nheads, headdim]`` with ``cu_seqlens_q``.
        k_cache, v_cache: ``[batch, seqlen_cache, nheads_k, headdim]``, or page pools
            ``[num_pages, page_size, nheads_k, headdim]`` with ``block_table``, any strides but a unit last one (so
            head-major pools, FlashInfer's HND, pass as ``pool.transpose(1, 2)``). Updated in place when
            ``k``/``v`` are given.
        cache_seqlens: int or int32 ``[batch]``, ``>= 0``: tokens already in the cache, before ``k``/``v`` are
            appended.
        block_table: int32 ``[batch, max_pages]``. The entries holding a sequence's keys, the appended ones included,
            must be pages of the pools; the ones past them are never read and may hold anything (-1, say).
        k, v: new keys/values, shaped like ``q`` (``nheads_k`` heads), appended at ``cache_seqlens``.
        cu_seqlens_q: int32 ``[batch + 1]`` offsets of packed ``q`` (and ``k``/``v``).
        max_seqlen_q: the longest packed sequence; used only during CUDA-graph capture and torch.compile, where
            nothing is read (a missing one is ``total_q``).
        max_seqlen_k: host-side bound of the keys per sequence after appending. With unpacked ``q`` it spares the
            call its host sync, and the caller vouches for ``cache_seqlens`` and ``block_table`` (lengths ``>= 0``
            and within ``max_seqlen_k``, page ids in use in range), as every flash-attn caller does (flash-attn
            checks neither); hf_flash's ``PagedCache`` keeps both on the host and checks them there. Without it the
            call reads the lengths and checks them and the page ids it uses, in one host sync; packed calls read
            their offsets anyway and check everything in that read. Required during CUDA-graph capture and
            torch.compile, where nothing is read or checked.
        num_splits: split-KV factor for single-token decode; 0 picks one from the shapes.
        The other arguments are as in ``attention``.

    Returns:
        ``out`` shaped like ``q`` (and the lse, ``[batch, nheads, seqlen_q]`` or ``[nheads, total_q]``).
    """
    packed = cu_seqlens_q is not None
    paged = block_table is not None
    q = _check_tensor("q", q, 3 if packed else 4)
    k_cache = _check_tensor("k_cache", k_cache, 4, in_place=True)
    v_cache = _check_tensor("v_cache", v_cache, 4, in_place=True)
    q4 = q[None] if packed else q
    _check_qkv(q4, k_cache, v_cache, batch_dims=2, names=("k_cache", "v_cache"))
    softmax_scale, causal, window, softcap = _check_options(softmax_scale, causal, window_size, softcap,
                                                             q.shape[-1])
    if packed:
        cu_seqlens_q, q_len = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
        batch, q_start = q_len.numel(), cu_seqlens_q[:-1]
    else:
        batch, max_q = q.shape[0], q.shape[1]
        q_start = q_len = None  # made below for the prefill launcher only: decode launches nothing but its kernels
    cache_seqlens, host_cache = _check_lengths("cache_seqlens", cache_seqlens, batch, q.device)
    # A contiguous cache is a pool of one page per sequence: both layouts share one code path.
    pages_k, pages_v = k_cache, v_cache
    if paged:
        table = _check_block_table(block_table, batch, q.device)
    else:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache has batch size {k_cache.shape[0]} but q has {batch}")
        table = torch.arange(batch, dtype=torch.int32, device=q.device)[:, None]
    _check_page_size("k_cache", k_cache)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 0 <= num_splits <= MAX_NUM_SPLITS:
        raise ValueError(f"num_splits must be an int from 0 to {MAX_NUM_SPLITS}, got {num_splits!r}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        k = _check_tensor("k", k, 3 if packed else 4)
        v = _check_tensor("v", v, 3 if packed else 4)
        if k.shape[:-2] != q.shape[:-2] or k.shape[-2:] != k_cache.shape[-2:] or v.shape != k.shape:
            raise ValueError(f"k/v must be shaped like q with the cache's heads, got k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)} for q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}")
        if any(t.dtype != q.dtype or t.device != q.device for t in (k, v)):
            raise ValueError(f"k/v are {k.dtype}/{v.dtype} on {k.device}/{v.device} but q is {q.dtype} on {q.device}")
    k_len = cache_seqlens + (q_len if packed else max_q) if k is not None else cache_seqlens
    foreign = any_foreign = None
    if _host_reads_forbidden(q.device) or (max_seqlen_k is not None and not packed):  # nothing read: caller vouches
        if packed:
            max_q = _check_bound("max_seqlen_q", max_seqlen_q, derived=q.shape[0])
        longest = _check_bound("max_seqlen_k", max_seqlen_k)
    else:  # one host read: the offsets, the lengths unless given as an int, whether a page id in use is out of range
        foreign = _foreign_pages(table, k_len, pages_k) if paged else None
        host_cu, host_read, any_foreign = _read_on_host(cu_seqlens_q if packed else None,
                                                        cache_seqlens if host_cache is None else None,
                                                        foreign.any() if paged else None)
        host_cache = host_read if host_cache is None else host_cache
        if packed:
            max_q, q_end = _check_cu_seqlens_values("cu_seqlens_q", host_cu, q.shape[0])
            if q_end != q.shape[0]:  # every packed row is a new token to append
                raise ValueError(f"cu_seqlens_q ends at {q_end} but q has {q.shape[0]} tokens")
        if min(host_cache, default=0) < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {host_cache[:8]}{'...' if batch > 8 else ''}")
        appended = [0] * batch
        if k is not None:
            appended = [b - a for a, b in itertools.pairwise(host_cu)] if packed else [max_q] * batch
        longest = max(map(operator.add, host_cache, appended), default=0)
    capacity = table.shape[1] * pages_k.shape[1]
    if longest > capacity:
        raise ValueError(f"the cache holds {capacity} tokens per sequence but {longest} are needed "
                         f"(cache_seqlens + new tokens)")
    if foreign is not None:
        _check_page_ids(table, foreign, any_foreign, pages_k.shape[0])
    window = _clip_window(window, max(max_q, longest))
    if k is not None:  # new tokens at positions cache_seqlens[b]... of each sequence, every one with a page (above)
        _append_pages_op(k, v, pages_k, pages_v, table, cache_seqlens, q_start)  # q_start: None unless packed
    if max_q == 1 and not packed:
        if num_splits == 0:
            num_splits = choose_num_splits(batch, k_cache.shape[-2], longest, q.device, head_dim=q.shape[-1],
                                           dtype=q.dtype)
        out = torch.empty_like(q)
        lse = torch.empty((batch, q.shape[2], 1), dtype=torch.float32, device=q.device)
        _paged_decode_op(q[:, 0], pages_k, pages_v, table, k_len, out[:, 0], lse[:, :, 0],
                         softmax_scale=softmax_scale, window_left=window[0], softcap=softcap, num_splits=num_splits)
    else:
        # Fills, not _dense_lengths' cache: its blocking copy on a miss (a new chunk length) would sync a call that
        # max_seqlen_k spares every sync (PagedCache's prefill).
        zeros = torch.zeros(batch, dtype=torch.int32, device=q.device)
        if not packed:
            q_start, q_len = zeros, torch.full_like(zeros, max_q)
        out = torch.empty_like(q)
        _, lse = _run_prefill(q4, pages_k, pages_v, q_start, q_len, zeros, k_len, max_q,
                              softmax_scale=softmax_scale, causal=causal, window=window, softcap=softcap,
                              block_table=table, out=out[None] if packed else out)
        lse = lse[0] if packed else lse
    return _results(out, lse, return_softmax_lse, q, k_cache, v_cache, k, v)


def write_kv_pages(k, v, k_pool, v_pool, slot_mapping, *, max_slot=None):
    """Store new tokens in page pools (vLLM's ``reshape_and_cache``).

    Args:
        k, v: ``[num_tokens, nheads_k, headdim]``.
        k_pool, v_pool: ``[num_pages, page_size, nheads_k, headdim]``, updated in place.
        slot_mapping: int64 ``[num_tokens]``: ``page * page_size + row`` for each token, checked against the pools'
            size in one host sync (but during CUDA-graph capture: there the caller vouches); negative slots are
            skipped.
        max_slot: the largest slot of ``slot_mapping``, known on the host (hf_flash's ``PagedCache`` takes it from
            its page table): then it is checked against the pools without reading the device.
    """
    k = _check_tensor("k", k, 3)
    v = _check_tensor("v", v, 3)
    k_pool = _check_tensor("k_pool", k_pool, 4, in_place=True)
    v_pool = _check_tensor("v_pool", v_pool, 4, in_place=True)
    for name, t in (("v", v), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dtype != k.dtype or t.device != k.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but k is {k.dtype} on {k.device}; they must match")
    if v.shape != k.shape or k_pool.shape != v_pool.shape or k.shape[1:] != k_pool.shape[2:]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} must be [num_tokens, nheads_k, headdim] matching "
                         f"the pools' k_pool {tuple(k_pool.shape)} / v_pool {tuple(v_pool.shape)}")
    if (not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype != torch.int64
            or slot_mapping.shape != (k.shape[0],) or slot_mapping.device != k.device):
        raise ValueError(f"slot_mapping must be an int64 tensor of shape ({k.shape[0]},) on {k.device}, got "
                         f"{getattr(slot_mapping, 'dtype', type(slot_mapping).__name__)} "
                         f"{tuple(getattr(slot_mapping, 'shape', ()))}")
    slot_mapping = _unit_stride(slot_mapping)
    num_pages, page_size = k_pool.shape[:2]
    if max_slot is not None:
        if _check_bound("max_slot", max_slot) >= num_pages * page_size:
            raise ValueError(f"max_slot = {max_slot} is past the pools' {num_pages * page_size} slots "
                             f"({num_pages} pages of {page_size})")
    elif not _host_reads_forbidden(k.device):  # under capture and torch.compile the caller vouches for the slots
        past_end = slot_mapping >= num_pages * page_size
        if past_end.any():  # the one host sync; the error path reads where (a second one, only there)
            i = int(past_end.nonzero()[0])
            raise ValueError(f"slot_mapping[{i}] = {int(slot_mapping[i])} is past the pools' "
                             f"{num_pages * page_size} slots ({num_pages} pages of {page_size})")
    _write_pages_op(k, v, k_pool, v_pool, slot_mapping)


def merge_state(out_a, lse_a, out_b, lse_b):
    """Merge two attention states over disjoint key sets (split-KV, shared prefix).

    Args:
        out_a, out_b: ``[tokens, nheads, headdim]``.
        lse_a, lse_b: float32 ``[tokens, nheads]``, natural log; ``-inf`` marks an empty state.

    Returns:
        ``(out, lse)`` of attention over the union of both key sets.
    """
    out_a = _check_tensor("out_a", out_a, 3)
    out_b = _check_tensor("out_b", out_b, 3)
    lse_a = _check_tensor("lse_a", lse_a, 2, dtypes=(torch.float32,))
    lse_b = _check_tensor("lse_b", lse_b, 2, dtypes=(torch.float32,))
    if out_a.shape != out_b.shape or out_a.dtype != out_b.dtype:
        raise ValueError(f"out_a {out_a.dtype} {tuple(out_a.shape)} and out_b {out_b.dtype} {tuple(out_b.shape)} "
                         f"must have one shape and dtype")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != out_a.shape[:2]:
            raise ValueError(f"{name} must have shape {tuple(out_a.shape[:2])}, got {tuple(t.shape)}")
    for name, t in (("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        if t.device != out_a.device:
            raise ValueError(f"{name} is on {t.device} but out_a is on {out_a.device}")
    out = torch.empty_like(out_a)
    lse = torch.empty_like(lse_a)
    _merge_state_op(out_a, lse_a, out_b, lse_b, out, lse)
    return _results(out, lse, True, out_a, lse_a, out_b, lse_b)


def choose_num_splits(batch, num_kv_heads, max_seqlen_k, device, *, head_dim, dtype):
    """The split-KV factor ``attention_with_kvcache(num_splits=0)`` picks for single-token decode on ``device``."""
    slots = _program_slots(head_dim, dtype, device)
    return _backend(device).choose_num_splits(batch, num_kv_heads, max_seqlen_k, slots, head_dim)


@torch.compiler.assume_constant_result  # torch.compile asks it (a constant per device and tile) rather than tracing it
def _program_slots(head_dim, dtype, device):
    return _backend(device).program_slots(head_dim, dtype, device)

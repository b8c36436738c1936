"""hf_flash's launchers as custom ops (``torch.ops.hf_flash.*``): ``torch.library.opcheck`` of each op (schema,
fake implementation, autograd registration, AOT dispatch) on the torch path and on the Triton kernels (Triton's
interpreter on CPU), and the public API traced by torch.compile without a graph break, giving the eager results."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from test_ops import _valid, backend, good  # noqa: F401  (fixtures: every test runs on both backends)

import hf_flash.ops

OPS = torch.ops.hf_flash


def _op_cases(device):
    """Case -> (op, args, kwargs): small valid launches of each op, outputs zeroed (no NaN from empty memory)."""

    def r(*shape, dtype=torch.float16):
        return torch.randn(*shape, device=device).to(dtype)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    def zeros(*shape, dtype=torch.float16):
        return torch.zeros(*shape, dtype=dtype, device=device)

    f32 = torch.float32
    q, k, v = r(2, 5, 4, 32), r(2, 7, 2, 32), r(2, 7, 2, 32)
    k_pool, v_pool, table = r(6, 4, 2, 32), r(6, 4, 2, 32), i32([[0, 2], [5, 1]])  # 8 keys per sequence
    q_len, k_len, starts = i32([5, 3]), i32([7, 4]), i32([0, 0])
    prefill = {"softmax_scale": 0.2, "causal": True, "window_left": -1, "window_right": -1, "softcap": 0.0}
    decode = {"softmax_scale": 0.2, "window_left": 3, "softcap": 30.0}
    decode_args = (r(2, 4, 32), k_pool, v_pool, table, k_len, zeros(2, 4, 32), zeros(2, 4, dtype=f32))
    return {
        "prefill": (OPS.prefill.default, (q, k, v, zeros(2, 5, 4, 32), zeros(2, 4, 5, dtype=f32), starts, q_len,
                                          starts, k_len, None, 5), prefill),
        "prefill-paged": (OPS.prefill.default, (q, k_pool, v_pool, zeros(2, 5, 4, 32), zeros(2, 4, 5, dtype=f32),
                                                starts, q_len, starts, k_len, table, 5), prefill),
        "paged_decode": (OPS.paged_decode.default, decode_args, {**decode, "num_splits": 1}),
        "paged_decode-split": (OPS.paged_decode.default, decode_args, {**decode, "num_splits": 2}),
        "merge_state": (OPS.merge_state.default, (r(3, 4, 32), r(3, 4, dtype=f32), r(3, 4, 32), r(3, 4, dtype=f32),
                                                  zeros(3, 4, 32), zeros(3, 4, dtype=f32)), {}),
        "write_pages": (OPS.write_pages.default, (r(3, 2, 32), r(3, 2, 32), k_pool.clone(), v_pool.clone(),
                                                  torch.tensor([5, -1, 22], device=device)), {}),
        # 2 new tokens a sequence after 3 and 1 cached ones (sequence 0's cross into its second page); packed: 2 for
        # sequence 0 after its 3, 1 for sequence 1 after its 4
        "append_pages": (OPS.append_pages.default, (r(2, 2, 2, 32), r(2, 2, 2, 32), k_pool.clone(), v_pool.clone(),
                                                    table, i32([3, 1]), None), {}),
        "append_pages-packed": (OPS.append_pages.default, (r(3, 2, 32), r(3, 2, 32), k_pool.clone(), v_pool.clone(),
                                                           table, i32([3, 4]), i32([0, 2])), {}),
    }


@pytest.mark.parametrize("case", list(_op_cases("cpu")))
def test_opcheck(case, backend, device):
    op, args, kwargs = _op_cases(device)[case]
    torch.library.opcheck(op, args, kwargs)


# case -> (test_ops' entry point, arguments added to its valid ones). A cache's calls give max_seqlen_k, as they must
# where nothing is read; varlen calls get their bounds from the packed lengths.
COMPILED = {
    "attention": ("attention", {}),
    "varlen": ("varlen", {}),
    "varlen-bounds": ("varlen", {"max_seqlen_q": 7, "max_seqlen_k": 7}),
    "paged-varlen": ("paged_varlen", {}),
    "kvcache-append": ("kvcache", {"max_seqlen_k": 4}),
    "paged-kvcache": ("paged_kvcache", {"max_seqlen_k": 3}),
    "packed-kvcache": ("packed_kvcache", {"max_seqlen_k": 3}),
    "merge": ("merge", {}),
    "write-pages": ("write_pages", {}),
    "write-pages-max-slot": ("write_pages", {"max_slot": 5}),
}


def _cloned(kwargs):
    return {name: t.clone() if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}


@pytest.mark.parametrize("case", COMPILED)
def test_compiled_call_has_no_graph_break(case, good, backend):
    """fullgraph=True fails on any graph break: validation reads no device value while dynamo traces (as during
    CUDA-graph capture) and the launches are ops of the graph. Outputs and in-place writes (caches, pools) match the
    eager call's, which reads and checks everything."""
    entry, extra = COMPILED[case]
    fn, kwargs = _valid(good)[entry]
    kwargs = {**kwargs, **extra}
    eager_kwargs, compiled_kwargs = _cloned(kwargs), _cloned(kwargs)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(**compiled_kwargs)
    want = fn(**eager_kwargs)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(compiled_kwargs, eager_kwargs, atol=0, rtol=0)


def test_compiled_cache_call_needs_max_seqlen_k(good):
    """A cache's lengths set the split count: where they cannot be read the caller gives max_seqlen_k, and a compiled
    call without it raises the eager ValueError (not a silent read: dynamo traces the raise)."""
    fn, kwargs = _valid(good)["paged_kvcache"]
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="max_seqlen_k must be given during CUDA-graph capture and torch.compile"):
        torch.compile(fn, backend="aot_eager")(**kwargs)


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops it sees and runs them."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher_where_nothing_watches():
    """The launchers run their op's body directly for plain tensors in eager mode (the round trip costs ~15 us a
    call), and through the op for tensor subclasses and under any dispatch mode. The count of modes is a private torch
    function: without it every call would take the slow way."""
    assert hasattr(torch._C, "_len_torch_dispatch_stack")
    plain = torch.zeros(2)
    assert not hf_flash.ops._through_dispatcher(plain)
    assert hf_flash.ops._through_dispatcher(torch.nn.Parameter(plain))
    with _Recorder():
        assert hf_flash.ops._through_dispatcher(plain)
    with FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(plain)
    assert hf_flash.ops._through_dispatcher(fake)


@pytest.mark.parametrize("case", ["attention", "varlen", "paged_kvcache", "merge", "write_pages"])
def test_a_dispatch_mode_sees_the_launch(case, good, backend):
    """Under a TorchDispatchMode (make_fx's tracing, FlopCounterMode, a logger) the launch is the op, which the mode
    sees; the results are the eager call's."""
    fn, kwargs = _valid(good)[case]
    eager_kwargs, watched_kwargs = _cloned(kwargs), _cloned(kwargs)
    want = fn(**eager_kwargs)
    recorder = _Recorder()
    with recorder:
        got = fn(**watched_kwargs)
    assert any(op.startswith("hf_flash.") for op in recorder.seen), recorder.seen
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(watched_kwargs, eager_kwargs, atol=0, rtol=0)

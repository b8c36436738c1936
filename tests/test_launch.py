"""hf_flash.kernels.launch: a launch that skips Triton's binding must run the kernel Triton would bind. Its key
(``_arg_class``) keeps apart every argument Triton specializes differently, checked against the installed Triton's own
specializer without a GPU; on a GPU, launches of the same shape that differ only in alignment or a stride's
divisibility each run their own kernel and match the reference (the conftest also checks every cached launch of the
suite against Triton's binder)."""
import itertools
import types

import pytest
import torch
from hf_flash import kernels
from test_kernel_prefill import _dense, _run_dense


@pytest.mark.parametrize("a, b", [(1, 2), (16, 17), (32, 1), (2**31 - 16, 2**31), (2**63 - 16, 2**63), (-16, -17),
                                  (True, False), (1, True), (0.5, 1), (None, 0)])
def test_arguments_triton_specializes_apart_get_different_keys(a, b):
    assert kernels._arg_class(a) != kernels._arg_class(b)


def test_same_classes_share_a_key():
    assert kernels._arg_class(32) == kernels._arg_class(48)
    assert kernels._arg_class(3) == kernels._arg_class(5)
    assert kernels._arg_class(0.5) == kernels._arg_class(2.0)
    buffer = torch.empty(64, dtype=torch.float16)
    assert kernels._arg_class(buffer[8:]) == kernels._arg_class(buffer[16:])


def test_tensors_differ_by_dtype_and_alignment():
    buffer = torch.empty(64, dtype=torch.float16)
    assert kernels._arg_class(buffer) != kernels._arg_class(buffer[1:])  # 2 bytes off 16
    assert kernels._arg_class(buffer) != kernels._arg_class(buffer.view(torch.bfloat16))


def test_descriptors_differ_by_any_specialized_part():
    base = torch.empty(64, 64, dtype=torch.float16)

    def descriptor(**changes):
        fields = dict(base=base, shape=[64, 64], strides=[64, 1], block_shape=[16, 64], layout="L", padding="zero")
        return types.SimpleNamespace(**(fields | changes))

    first = kernels._arg_class(descriptor())
    assert first == kernels._arg_class(descriptor())
    for changes in (dict(base=base[:, 1:]), dict(block_shape=[32, 64]), dict(layout="M"), dict(padding="nan"),
                    dict(base=base.view(torch.bfloat16))):
        assert kernels._arg_class(descriptor(**changes)) != first, changes


def _triton_specializer():
    """The installed Triton's own specialization of a launch argument, for an sm90 target (no GPU needed); None where
    this Triton has no native specializer (before 3.3) or no NVIDIA backend."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        return None
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    return lambda arg: native_specialize_impl(backend, arg, False, True, True)  # not const; specialize; on alignment


def _sample_arguments():
    ints = [0, 1, 2, 15, 16, 17, 48, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**32, 2**63 - 16, 2**63, 2**64 - 16]
    buffers = [torch.empty(64, dtype=dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int32)]
    tensors = [buffer[offset:] for buffer in buffers for offset in (0, 1, 8)]
    descriptors = []
    from triton.tools.tensor_descriptor import TensorDescriptor
    base = torch.empty(4, 64, 8, 64, dtype=torch.float16)
    for block in ([1, 16, 1, 64], [1, 32, 1, 64]):
        for padding in ("zero", "nan"):
            descriptors.append(TensorDescriptor(base, list(base.shape), list(base.stride()), block, padding=padding))
    if kernels.prefill_sm90.GLUON_ERROR is None:
        for block in ([1, 16, 1, 64], [1, 64, 1, 64], [1, 64, 1, 32]):
            for element, tensor in ((kernels.prefill_sm90.gl.float16, base),
                                    (kernels.prefill_sm90.gl.bfloat16, base.view(torch.bfloat16))):
                layout = kernels.prefill_sm90.box_layout(block[1], block[3], element)
                descriptors.append(kernels.prefill_sm90.TensorDescriptor(tensor, list(tensor.shape),
                                                                         list(tensor.stride()), block, layout))
    return ints + [True, False, 0.5, 1.0, 2.0, None] + tensors + descriptors


def test_keys_are_at_least_as_fine_as_the_installed_triton():
    """Arguments this Triton specializes apart never share a launch key: checked against its own specializer on the
    CPU, so CI checks the Tritons of its two venvs (the GPU suite's binder check runs the device's)."""
    specialize = _triton_specializer()
    if specialize is None:
        pytest.skip("this Triton has no native specializer or NVIDIA backend")
    args = _sample_arguments()
    triton_keys = [specialize(arg) for arg in args]
    ours = [kernels._arg_class(arg) for arg in args]
    assert None not in ours
    merged = [(ta, tb, ka) for (ta, ka), (tb, kb) in itertools.combinations(zip(triton_keys, ours), 2)
              if ta != tb and ka == kb]  # Triton's two keys and the one launch key they would share
    assert not merged, merged
    assert len(set(map(str, triton_keys))) > 20  # the sample does exercise Triton's classes


def test_unknown_arguments_are_not_cached():
    assert kernels._arg_class(object()) is None


@pytest.mark.cuda
def test_alternating_specializations_each_run_their_own_kernel(device):
    """The same launcher and shape, called in turn on aligned and misaligned tensors and on a stride that 16 divides
    and one it does not: each call matches the reference. Aligned and misaligned views run different kernels; the stride
    72 view may share the aligned view's (on Hopper the stride is a field of its TMA descriptor, not a specialization)."""
    kernels._COMPILED.clear()
    q, k, v = _dense(2, 40, 40, 4, 2, 64, torch.float16, device)
    wide = torch.randn(2, 40, 4, 72, device=device).to(torch.float16)  # head stride 72: not a multiple of 16
    misaligned = torch.randn(2, 40, 4, 65, device=device).to(torch.float16)[..., 1:]  # 2 bytes off 16
    for q_view in (q, misaligned, q, wide[..., :64], q, misaligned):
        _run_dense(q_view, k, v, causal=True)
    assert len({key[2] for key in kernels._COMPILED}) >= 2


def test_clear_compiled_drops_only_that_kernels_launches(monkeypatch):
    class Kernel:
        def __init__(self):
            self.device_caches = {0: "compiled"}

    first, second = Kernel(), Kernel()
    monkeypatch.setattr(kernels, "_COMPILED", {(first, 0, (), (), False): "a", (second, 0, (), (), False): "b"})
    kernels.clear_compiled(first)
    assert first.device_caches == {} and second.device_caches == {0: "compiled"}
    assert list(kernels._COMPILED.values()) == ["b"]


@pytest.mark.parametrize("given, expected", [({}, True), ({"enable_fp_fusion": False}, False)])
def test_every_launch_asks_for_fp_fusion_unless_told(given, expected):
    # Triton 3.10 stops fusing by default: the kernels' fmas must not hang on that default (every launcher goes
    # through kernels.launch; scripts/compile_sm90.py compiles the Gluon prefill with fusion off by default).
    seen = []

    class Kernel:
        fn = types.SimpleNamespace(__name__="kernel")
        params = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs)

    kernels.launch(Kernel(), (1,), object(), num_warps=4, **given)  # an uncached argument: Triton's own path
    assert seen == [{"enable_fp_fusion": expected, "num_warps": 4}]

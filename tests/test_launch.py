"""hf_flash.kernels.launch: a launch that skips Triton's binding must run the kernel Triton would bind. Its key
(``_arg_class``) keeps apart every argument Triton specializes differently; on a GPU, launches of the same shape that
differ only in alignment or a stride's divisibility each run their own kernel and match the reference (the conftest
also checks every cached launch of the suite against Triton's binder)."""
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

"""The Hopper prefill kernel in Gluon (``hf_flash.kernels.prefill_sm90``) against the float64 reference, through
``prefill`` as every caller reaches it, with the helpers of test_kernel_prefill (fresh inputs, NaN-poisoned outputs,
lse checked, rows owned by no sequence left untouched). It runs on sm90 GPUs only (Gluon has no interpreter); the
``sm90`` fixture checks that each call of the test took it."""
import pytest
import torch
from triton.compiler.errors import CompilationError
from hf_flash.kernels import prefill_sm90
from test_kernel_prefill import (_check_an_empty_sequence_writes_nothing, _check_rows_that_see_nothing, _dense,
                                 _run_dense, _run_padded_batch, _run_varlen_packed)

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
on_sm90 = pytest.mark.skipif(not SM90, reason="the Gluon prefill is for sm90 GPUs")


@pytest.fixture(params=sorted({config for config in prefill_sm90.SM90_CONFIGS.values()} | {(128, 128, 3, 8)}),
                ids=str)
def sm90(request, monkeypatch):
    """Runs the test with each shipped tile config (and the two-warpgroup one) for both head dims, and checks that
    every prefill call took the Gluon kernel."""
    for head_dim in prefill_sm90.SM90_CONFIGS:
        monkeypatch.setitem(prefill_sm90.SM90_CONFIGS, head_dim, request.param)
    taken, path = [], prefill_sm90.sm90_path

    def recorded(*args, **kwargs):
        taken.append(path(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(prefill_sm90, "sm90_path", recorded)
    yield
    assert taken and all(taken), taken


@on_sm90
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_k, hq, hkv", [(37, 37, 4, 4), (19, 53, 4, 2), (53, 19, 4, 1), (300, 700, 4, 2)])
def test_dense(head_dim, dtype, causal, seq_q, seq_k, hq, hkv, sm90, device):
    # Ragged last query and key tiles, GQA and MQA, bottom-right causal both ways, several key tiles per program (the
    # unmasked loop, then the masked one).
    _run_dense(*_dense(2, seq_q, seq_k, hq, hkv, head_dim, dtype, device), causal=causal)


@on_sm90
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_packed(causal, head_dim, sm90, device):
    # One batch entry shared by every sequence: tiles read the next sequence's rows past a sequence's end, which the
    # masks hide and the stores skip.
    _run_varlen_packed([13, 0, 141, 1, 70], [13, 5, 250, 9, 0], head_dim, causal, device)


@on_sm90
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_padded_batch(causal, head_dim, sm90, device):
    # NaN in the padding rows around each sequence's queries and keys: the last key tile reads some.
    _run_padded_batch(head_dim, causal, (-1, -1), device)


@on_sm90
def test_an_empty_sequence_writes_nothing(sm90, device):
    _check_an_empty_sequence_writes_nothing(device)


@on_sm90
def test_rows_that_see_nothing(sm90, device):
    _check_rows_that_see_nothing(device, window=False)  # (a window is not the Gluon kernel's)


@pytest.mark.parametrize("window, softcap, dtype", [((7, -1), 0.0, torch.bfloat16), ((-1, -1), 1.5, torch.bfloat16),
                                                    ((-1, -1), 0.0, torch.float32)])
@on_sm90
def test_what_it_does_not_serve_keeps_the_triton_kernel(window, softcap, dtype, device):
    q, k, v = _dense(2, 45, 61, 4, 2, 64, dtype, device)
    assert not prefill_sm90.sm90_path(q, k, v, torch.empty_like(q), causal=True, window_left=window[0],
                                      window_right=window[1], softcap=softcap, softmax_scale=0.125)
    _run_dense(q, k, v, causal=True, window=window, softcap=softcap)


@pytest.mark.skipif(prefill_sm90.GLUON_ERROR is not None, reason="no Gluon in this Triton")
def test_a_kernel_this_triton_cannot_compile_falls_back_once_and_says_why(monkeypatch, caplog, device):
    # Gluon's names move between Triton releases (3.9 renamed the TMA load and the CTA barrier): a compile error
    # sends the call, and every later one, to the Triton kernel, with one warning, and launches nothing first.
    class Uncompilable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise CompilationError("kernel source", None, "no such builtin")
            return launch

    monkeypatch.setattr(prefill_sm90, "_prefill_sm90_kernel", Uncompilable())
    monkeypatch.setattr(prefill_sm90, "COMPILE_ERROR", None)
    path = prefill_sm90.sm90_path
    monkeypatch.setattr(prefill_sm90, "sm90_path", lambda *args, **kwargs: prefill_sm90.COMPILE_ERROR is None)
    prefill_sm90._say_unusable.cache_clear()
    with caplog.at_level("WARNING", logger="hf_flash"):
        for _ in range(2):
            _run_dense(*_dense(2, 37, 53, 4, 2, 64, torch.float16, device), causal=True)
    assert isinstance(prefill_sm90.COMPILE_ERROR, CompilationError)
    said = [r.getMessage() for r in caplog.records if "does not compile" in r.getMessage()]
    assert len(said) == 1 and "no such builtin" in said[0], said
    if torch.device(device).type == "cuda":  # the real rule turns calls away from now on
        q, k, v = _dense(1, 8, 8, 2, 2, 64, torch.float16, device)
        assert not path(q, k, v, q, causal=True, window_left=-1, window_right=-1, softcap=0.0, softmax_scale=0.125)
    prefill_sm90._say_unusable.cache_clear()

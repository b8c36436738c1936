"""The prefill kernel's TMA path (sm90: tensor descriptors, optional warp specialization) against the float64
reference, with the helpers of test_kernel_prefill (fresh inputs, NaN-poisoned outputs, lse checked, rows owned by no
sequence left untouched).

Without a GPU the kernels run in Triton's interpreter, which has tensor descriptors (loads zero-fill the rows past a
descriptor's shape, stores drop them, base and strides must be 16-byte aligned) but is no sm90: the ``tma`` fixture
sets ``INTERPRET_AS_SM90``. The interpreter ignores ``warp_specialize`` (a compiler hint), but the kernel's
warp-specialized structure (one masked key loop, no early return) is what it runs then. On an sm90 GPU the same tests
run the real path, warp-specialized or not; elsewhere they skip. Every test checks that each launch took the path."""
import pytest
import torch
from hf_flash.kernels import prefill as prefill_module
from pages import scatter_to_pages
from test_kernel_prefill import (_check_an_empty_sequence_writes_nothing, _check_rows_that_see_nothing, _dense,
                                 _i32, _run, _run_dense, _run_padded_batch, _run_varlen_packed)

ON_GPU = torch.cuda.is_available()
# Warp-specialized configs for the GPU runs (Triton 3.6 specializes at 4 warps on sm90: a producer warp group beside
# the math ones); compiled for sm90 offline, within the 227 KiB of shared memory.
GPU_WS_CONFIGS = {64: (128, 128, 4, 2, True), 128: (128, 64, 4, 2, True)}


class _LaunchSpy:
    """Stands in for the prefill module's ``launch``: records each ``_prefill_kernel`` launch's (TMA, WARP_SPECIALIZE)
    and launches it."""

    def __init__(self, launch):
        self.launch, self.launches = launch, []

    def __call__(self, kernel, grid, *args, **kwargs):
        if kernel is prefill_module._prefill_kernel:
            self.launches.append((kwargs["TMA"], kwargs["WARP_SPECIALIZE"]))
        return self.launch(kernel, grid, *args, **kwargs)


@pytest.fixture
def spy(monkeypatch):
    recorder = _LaunchSpy(prefill_module.launch)
    monkeypatch.setattr(prefill_module, "launch", recorder)
    return recorder


@pytest.fixture(params=[False, True], ids=["plain", "warp_specialized"])
def tma(request, monkeypatch, spy):
    """Sends qualifying calls down the TMA path (warp-specialized or not) and checks afterwards that every launch of
    the test took it."""
    if ON_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA path is for sm90")
    warp_specialize = request.param
    monkeypatch.setattr(prefill_module, "INTERPRET_AS_SM90", True)
    # the Gluon kernel serves the dense 16-bit calls first on an sm90 GPU (test_kernel_prefill_sm90.py)
    monkeypatch.setattr(prefill_module.prefill_sm90, "sm90_path", lambda *args, **kwargs: False)
    monkeypatch.setattr(prefill_module, "TMA_MIN_SEQLEN_Q", 1)  # these tests' sequences are short
    monkeypatch.setattr(prefill_module, "INTERPRET_TMA_CONFIG", (32, 16, 4, 1, warp_specialize))
    if warp_specialize:
        for head_dim, config in GPU_WS_CONFIGS.items():
            monkeypatch.setitem(prefill_module.TMA_CONFIGS, head_dim, config)
    yield warp_specialize
    assert spy.launches and all(launch == (True, warp_specialize) for launch in spy.launches), spy.launches


@pytest.mark.parametrize("head_dim, dtype", [(64, torch.float16), (128, torch.bfloat16)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_k, hq, hkv", [(37, 37, 4, 4), (19, 53, 4, 2), (53, 19, 4, 1)])
def test_dense(head_dim, dtype, causal, seq_q, seq_k, hq, hkv, tma, device):
    # Ragged last query and key tiles (TMA's zero fill and clipped stores), GQA and MQA, bottom-right causal both ways.
    _run_dense(*_dense(2, seq_q, seq_k, hq, hkv, head_dim, dtype, device), causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_packed(causal, tma, device):
    # One batch entry shared by every sequence: each descriptor starts at its sequence's row and ends at its length,
    # so no tile reads the next sequence's keys or writes its rows.
    _run_varlen_packed([13, 0, 41, 1, 7], [13, 5, 50, 9, 0], 64, causal, device)


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (6, 6))])
def test_padded_batch(causal, window, tma, device):
    _run_padded_batch(128, causal, window, device)


@pytest.mark.parametrize("causal, window, softcap", [(True, (7, -1), 0.0), (False, (17, 20), 0.0),
                                                     (True, (-1, -1), 1.5), (False, (9, -1), 1.5)])
def test_window_softcap(causal, window, softcap, tma, device):
    q, k, v = _dense(2, 45, 61, 4, 2, 64, torch.bfloat16, device)
    _run_dense(q * 2, k, v, causal=causal, window=window, softcap=softcap)  # logits ~N(0, 4): the cap bites


def test_an_empty_sequence_writes_nothing(tma, device):
    # The warp-specialized kernel cannot return early: it runs the empty sequence's tiles, and a tensor map needs a row.
    _check_an_empty_sequence_writes_nothing(device)


def test_rows_that_see_nothing(tma, device):
    _check_rows_that_see_nothing(device)


INTERPRET_TILES = [(16, 32), (16, 16), (64, 16)]
GPU_TILES = [(64, 128), (64, 64), (128, 64)]


@pytest.mark.parametrize("tile", range(len(INTERPRET_TILES)), ids=[f"{m}x{n}" for m, n in INTERPRET_TILES])
def test_other_tile_shapes(tile, tma, monkeypatch, device):
    # BLOCK_N > BLOCK_M, equal, and several key tiles per query tile (GPU: the tuner's smaller shapes).
    block_m, block_n = (GPU_TILES if ON_GPU else INTERPRET_TILES)[tile]
    monkeypatch.setattr(prefill_module, "INTERPRET_TMA_CONFIG", (block_m, block_n, 4, 1, tma))
    monkeypatch.setitem(prefill_module.TMA_CONFIGS, 64, (block_m, block_n, 4, 2, tma))
    q, k, v = _dense(2, 50, 67, 2, 1, 64, torch.float16, device)
    _run_dense(q, k, v, causal=True, window=(20, -1))
    _run_dense(q, k, v, causal=False)


def test_path_selection(monkeypatch, device):
    # Which calls qualify: the others keep the pointer kernel.
    if ON_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA path is for sm90")
    monkeypatch.setattr(prefill_module, "INTERPRET_AS_SM90", True)
    # the Gluon kernel serves the dense 16-bit calls first on an sm90 GPU (test_kernel_prefill_sm90.py)
    monkeypatch.setattr(prefill_module.prefill_sm90, "sm90_path", lambda *args, **kwargs: False)
    monkeypatch.setattr(prefill_module, "TMA_MIN_SEQLEN_Q", 4)

    def takes(q, k, v, block_table=None):
        return prefill_module.tma_path(q, k, v, torch.empty_like(q), q.shape[1], block_table)

    q, k, v = _dense(2, 8, 8, 4, 2, 64, torch.bfloat16, device)
    assert takes(q, k, v)
    assert not takes(q[:, :3], k, v)  # too short to pay for the descriptors
    assert takes(q[:, :5], k, v)  # a sequence slice keeps the row strides
    assert takes(*(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)))  # [B, H, S, D] storage
    assert not takes(q.float(), k.float(), v.float())
    assert not takes(*_dense(2, 8, 8, 4, 2, 80, torch.bfloat16, device))
    assert not takes(*_dense(2, 8, 8, 4, 2, 256, torch.bfloat16, device))
    k_pool, v_pool, table, _ = scatter_to_pages([8, 8], 2, 64, 16, torch.bfloat16, device)
    assert not takes(q, k_pool, v_pool, table)
    wide = torch.randn(2, 8, 4, 68, device=device).to(torch.bfloat16)
    assert not takes(wide[..., :64], k, v)  # rows 136 bytes apart
    flat = torch.randn(k.numel() + 4, device=device).to(torch.bfloat16)
    assert not takes(q, k, flat[4:].view(k.shape))  # base address 8 bytes past alignment
    if not ON_GPU:
        monkeypatch.setattr(prefill_module, "INTERPRET_AS_SM90", False)
        assert not takes(q, k, v)


def test_unaligned_falls_back(spy, monkeypatch, device):
    # A call that TMA cannot take runs the pointer kernel, with the same results.
    if ON_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA path is for sm90")
    monkeypatch.setattr(prefill_module, "INTERPRET_AS_SM90", True)
    # the Gluon kernel serves the dense 16-bit calls first on an sm90 GPU (test_kernel_prefill_sm90.py)
    monkeypatch.setattr(prefill_module.prefill_sm90, "sm90_path", lambda *args, **kwargs: False)
    monkeypatch.setattr(prefill_module, "TMA_MIN_SEQLEN_Q", 1)
    q, k, v = _dense(2, 21, 29, 2, 1, 64, torch.bfloat16, device)
    q = torch.cat([q, q[..., :4]], dim=-1)[..., :64]  # rows 136 bytes apart
    _run_dense(q, k, v, causal=True)
    assert spy.launches == [(False, False)]


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_large_bf16(head_dim, causal, tma, device):
    # The GPU configs (BLOCK_M 128) over many tiles and a ragged end, against fp64 and SDPA in fp32.
    q, k, v = _dense(2, 1000, 1300, 8, 2, head_dim, torch.bfloat16, device)
    _run_dense(q, k, v, causal=causal)
    mask = torch.ones(1000, 1300, dtype=torch.bool, device=device).tril(300) if causal else None
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().repeat_interleave(4, 2).transpose(1, 2),
        v.float().repeat_interleave(4, 2).transpose(1, 2), attn_mask=mask)
    out, _ = _run(q, k, v, *[_i32(x, device) for x in ([0, 0], [1000] * 2, [0, 0], [1300] * 2)], causal=causal)
    assert (out.float() - ref.transpose(1, 2)).abs().max() < 2e-2

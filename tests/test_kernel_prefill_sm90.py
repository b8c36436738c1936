"""The Hopper prefill kernel in Gluon (``hf_flash.kernels.prefill_sm90``) against the float64 reference, through
``prefill`` as every caller reaches it, with the helpers of test_kernel_prefill (fresh inputs, NaN-poisoned outputs,
lse checked, rows owned by no sequence left untouched). It runs on sm90 GPUs only (Gluon has no interpreter); the
``sm90`` fixture checks that each call of the test took it."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
import transformers
from triton.compiler.errors import CompilationError

import hf_flash
from hf_flash.kernels import prefill_sm90
from pages import scatter_to_pages
from test_kernel_prefill import (_check, _check_an_empty_sequence_writes_nothing, _check_rows_that_see_nothing, _dense,
                                 _i32, _run, _run_dense, _run_padded_batch, _run_varlen_packed)

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
on_sm90 = pytest.mark.skipif(not SM90, reason="the Gluon prefill is for sm90 GPUs")


# Beside the shipped tile configs: Q in registers with tiles of 64 keys, two warpgroups sharing K/V tiles, and one
# warpgroup without warp specialization (D128's config before it was warp-specialized).
OTHER_CONFIGS = {prefill_sm90.Sm90Config(64, 64, 3, 4, True), prefill_sm90.Sm90Config(128, 128, 3, 8, False),
                 prefill_sm90.Sm90Config(64, 64, 3, 4, False)}
COMPILE_SM90 = pathlib.Path(__file__).parents[1] / "scripts" / "compile_sm90.py"  # compiles it for sm90 without a GPU


def _record_sm90_path(monkeypatch):
    """Wraps ``sm90_path`` for the test: returns the list of (taken, paged) it appends to at each prefill call."""
    calls, path = [], prefill_sm90.sm90_path

    def recorded(*args, **kwargs):
        calls.append((path(*args, **kwargs), kwargs.get("block_table") is not None))
        return calls[-1][0]

    monkeypatch.setattr(prefill_sm90, "sm90_path", recorded)
    return calls


CONFIGS = sorted(set(prefill_sm90.SM90_CONFIGS.values()) | OTHER_CONFIGS)


@pytest.fixture(params=CONFIGS, ids=lambda c: str(tuple(c)))
def sm90(request, monkeypatch):
    """Runs the test with each shipped tile config and ``OTHER_CONFIGS`` for both head dims (the test gets the config),
    and checks that every prefill call took the Gluon kernel."""
    for key in prefill_sm90.SM90_CONFIGS:
        monkeypatch.setitem(prefill_sm90.SM90_CONFIGS, key, request.param)
    calls = _record_sm90_path(monkeypatch)
    yield request.param
    assert calls and all(taken for taken, _ in calls), calls


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
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_more_work_than_sms(causal, head_dim, sm90, device):
    # Over 132 work pairs (12 sequences x 4 heads x 4 pairs of query tiles at D128), so a persistent program goes on
    # to later items: ring and turn phases carried across items, empty sequences and tiles past a sequence skipped.
    _run_varlen_packed([700, 1, 300, 0, 1000, 129, 5, 640, 64, 999, 17, 256],
                       [700, 3, 450, 7, 1000, 129, 0, 800, 64, 1200, 17, 300], head_dim, causal, device)


@on_sm90
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_padded_batch(causal, head_dim, sm90, device):
    # NaN in the padding rows around each sequence's queries and keys: the last key tile reads some.
    _run_padded_batch(head_dim, causal, (-1, -1), device)


# Head dim 256: the shipped configs of that head dim and the one-warpgroup kernel at two programs per SM (the tile
# configs of the other head dims do not fit its shared memory).
CONFIGS_256 = sorted({c for (head_dim, _), c in prefill_sm90.SM90_CONFIGS.items() if head_dim == 256}
                     | {prefill_sm90.Sm90Config(64, 32, 2, 4, False)})


@on_sm90
@pytest.mark.parametrize("sm90", CONFIGS_256, indirect=True, ids=lambda c: str(tuple(c)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_k, hq, hkv", [(19, 53, 4, 2), (53, 19, 4, 1), (300, 700, 4, 2)])
def test_dense_head_dim_256(dtype, causal, seq_q, seq_k, hq, hkv, sm90, device):
    _run_dense(*_dense(2, seq_q, seq_k, hq, hkv, 256, dtype, device), causal=causal)


@on_sm90
@pytest.mark.parametrize("sm90", CONFIGS_256, indirect=True, ids=lambda c: str(tuple(c)))
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_256_varlen_and_pages(causal, sm90, device):
    _run_varlen_packed([700, 1, 300, 0, 1000, 129, 5, 640, 64, 999, 17, 256],
                       [700, 3, 450, 7, 1000, 129, 0, 800, 64, 1200, 17, 300], 256, causal, device)
    _run_padded_batch(256, causal, (-1, -1), device)
    # 16: a key tile in boxes of 16 rows, each the producer warp's copy (the one-warpgroup kernel takes 32 and up)
    for page_size in (prefill_sm90.MIN_BOX_ROWS[sm90.warp_specialized], 64):
        _run_paged(page_size, 256, torch.bfloat16, causal, device)


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
def test_every_shipped_config_compiles_for_sm90_with_this_triton():
    # No GPU needed: CI's Tritons (torch's pin and the newest) compile what the H200, with another Triton, runs; a
    # renamed Gluon builtin or a broken edit fails here, not as a silent fall-back to the Triton kernel on the GPU.
    # scripts/compile_sm90.py: dense causal and over the smallest pages each config reads by TMA, with ptxas's report.
    # Fusion off by default (Triton 3.10's default): the kernels still get their FMAs (kernels.COMPILE_OPTIONS).
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"} | {
        "TRITON_DEFAULT_FP_FUSION": "0"}
    done = subprocess.run([sys.executable, str(COMPILE_SM90)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = [re.search(r"fp32 fma [1-9]\d* shared (\d+) registers \d+ spills \d+ / \d+$", line)
                for line in done.stdout.splitlines()]
    shipped = {(head_dim, config) for (head_dim, _), config in prefill_sm90.SM90_CONFIGS.items()}
    assert len(compiled) == 2 * len(shipped) and all(compiled), done.stdout
    assert all(int(m.group(1)) <= 227 * 1024 for m in compiled), done.stdout  # the sm90 limit per program


@pytest.mark.skipif(prefill_sm90.GLUON_ERROR is not None, reason="no Gluon in this Triton")
@pytest.mark.parametrize("args, named", [(["--head-dim", "64", "--config", "64,64,x"], "--config"),
                                         (["--head-dim", "64", "--config", "64,64,4,4,0,0", "--page-size", "16"],
                                          "--page-size 16"),
                                         (["--causal"], "--causal")])
def test_compile_sm90_names_a_bad_argument(args, named):
    # Before anything compiles: argparse's exit 2, the argument named (pages of 16 are not the one-warpgroup kernel's).
    done = subprocess.run([sys.executable, str(COMPILE_SM90), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and named in done.stderr, done.stderr[-2000:]


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


@on_sm90
@pytest.mark.parametrize("page_size", [32, 64, 128])
@pytest.mark.parametrize("head_dim, dtype", [(64, torch.float16), (128, torch.bfloat16)])
@pytest.mark.parametrize("causal", [False, True])
def test_paged(page_size, head_dim, dtype, causal, sm90, device):
    # New queries over cached keys in pages scattered through the pool (a chunk of a prefill, a chat's next turn):
    # each key tile is one box per page it spans, or one box of a page that holds whole tiles. Unused rows, the
    # spare page and the unused block-table entries hold NaN.
    _run_paged(page_size, head_dim, dtype, causal, device)


@on_sm90
@pytest.mark.parametrize("sm90", [c for c in CONFIGS if c.warp_specialized], indirect=True, ids=lambda c: str(tuple(c)))
@pytest.mark.parametrize("head_dim, dtype", [(64, torch.float16), (128, torch.bfloat16)])
@pytest.mark.parametrize("causal", [False, True])
def test_pages_of_16_in_the_warp_specialized_kernel(head_dim, dtype, causal, sm90, device):
    # Its producer warp reads pages of 16 as eight boxes a key tile (the one-warpgroup kernel leaves them to Triton).
    _run_paged(16, head_dim, dtype, causal, device)


def _run_paged(page_size, head_dim, dtype, causal, device):
    q_lens, k_lens = [70, 1, 129], [300, 17, 129]
    k_pool, v_pool, table, keys = scatter_to_pages(k_lens, 2, head_dim, page_size, dtype, device)
    q = torch.randn(len(q_lens), max(q_lens), 4, head_dim, device=device).to(dtype)
    zeros, q_len = _i32([0] * len(q_lens), device), _i32(q_lens, device)
    out, lse = _run(q, k_pool, v_pool, zeros, q_len, zeros, _i32(k_lens, device), causal=causal, block_table=table)
    _check(out, lse, q, keys, zeros, q_len, causal=causal)


@on_sm90
@pytest.mark.parametrize("page_size", [8, 16, 48])
def test_small_pages_and_pages_that_split_tiles_unevenly_keep_the_triton_kernel(page_size, device):
    # Head dim 64 runs the one-warpgroup kernel, which reads pages of 32 keys at least.
    k_pool, v_pool, table, keys = scatter_to_pages([50], 2, 64, page_size, torch.bfloat16, device)
    q = torch.randn(1, 20, 4, 64, device=device).to(torch.bfloat16)
    assert not prefill_sm90.sm90_path(q, k_pool, v_pool, torch.empty_like(q), causal=True, window_left=-1,
                                      window_right=-1, softcap=0.0, softmax_scale=0.125, block_table=table)
    zeros = _i32([0], device)
    out, lse = _run(q, k_pool, v_pool, zeros, _i32([20], device), zeros, _i32([50], device), causal=True,
                    block_table=table)
    _check(out, lse, q, keys, zeros, _i32([20], device), causal=True)


def _logit_errors(dtype, page_size, head_dim, device):
    """Mean |logits - float32 logits| of a Llama of ``head_dim`` in ``dtype``, through hf_flash and through sdpa, on
    two prompts of 300 tokens: one forward without a cache (page_size 0), or the last 100 tokens prefilled over a
    cache that holds the first 200 (hf_flash: a PagedCache of ``page_size``; sdpa: a DynamicCache)."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=4 * head_dim, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()
    ids = torch.randint(0, 256, (2, 300), device=device)
    split = 200 if page_size else 0
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, split:].float()
        model.to(dtype)
        errors = {}
        for impl in ("sdpa", "hf_flash"):
            model.set_attn_implementation(impl)
            if page_size:
                cache = (hf_flash.PagedCache(config, page_size=page_size, dtype=dtype, device=device)
                         if impl == "hf_flash" else transformers.DynamicCache(config=config))
                model(input_ids=ids[:, :split], past_key_values=cache, use_cache=True)
                got = model(input_ids=ids[:, split:], past_key_values=cache, use_cache=True).logits
            else:
                got = model(input_ids=ids).logits
            assert torch.isfinite(got).all(), impl
            errors[impl] = (got.float() - want).abs().mean().item()
    return errors


@on_sm90
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [0, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16bit_model_through_the_kernel_is_as_close_to_float32_as_sdpa(dtype, page_size, head_dim, device,
                                                                         monkeypatch):
    # The model tests run float32, which never reaches this kernel: here a model's own calls take it, a forward
    # without a cache (dense) and a chunk prefilled over pages (a chat's next turn), and its logits must stay as close
    # to the float32 model's as sdpa's in the same dtype (their difference is mostly the 16-bit matmuls around it;
    # the kernel rounds the softmax weights to 16 bits before the value product, as flash-attn does, which hf_flash's
    # torch path on a CPU does too: 1.2x sdpa's error there, against a math kernel that keeps them in float32).
    calls = _record_sm90_path(monkeypatch)
    errors = _logit_errors(dtype, page_size, head_dim, device)
    assert (True, page_size > 0) in calls, calls  # the kernel took the model's calls, paged when they were
    assert errors["hf_flash"] <= 1.5 * errors["sdpa"], errors

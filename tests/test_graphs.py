"""generate() with a PagedCache: decode steps through ``hf_flash.graphs.DecodeGraphs`` (CUDA graphs on a GPU; on CPU
the same static buffers run eagerly, kernels in Triton's interpreter) and prompts prefilled in chunks, against
transformers' sdpa + DynamicCache, fp32, token for token."""
import gc
import logging
import os
import subprocess
import sys
import weakref

import pytest
import torch
import transformers
from test_cache import _generate as generate
from test_cache import cache_of
from test_models import left_padded_batch, tiny_model

from hf_flash import PagedCache, graphs, ops
from hf_flash.graphs import captured_graphs
from hf_flash.patches import generate as generate_patch
from hf_flash.internals import CACHE_NAME

NEW = 40


def _generate(model, impl, ids, mask, new=NEW, **kwargs):
    return generate(model, impl, ids, mask, new=new, do_sample=False, return_dict_in_generate=True, **kwargs)


@pytest.fixture
def graphs_on_any_device(monkeypatch):
    """Let generate() hand a PagedCache's decode steps to DecodeGraphs on CPU too (eagerly, on its static buffers)."""
    monkeypatch.setattr(generate_patch, "graphs_run_on", lambda device: True)


@pytest.fixture
def splits_growing_with_length(monkeypatch):
    """Split counts that grow with the longest sequence (18 to 57 keys here: buckets 1, 2 and 4), so one generate()
    goes through several graphs."""
    monkeypatch.setattr(ops, "choose_num_splits",
                        lambda batch, kv_heads, max_keys, device, **tile: max(1, max_keys // 12))


def test_decode_graphs_match_sdpa(device, graphs_on_any_device, splits_growing_with_length):
    """Greedy tokens through captured-and-replayed steps (several split buckets) equal sdpa's and the eager paged
    path's; on a GPU the steps were captured."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([17, 9, 4]))
    blas_library = torch.backends.cuda.preferred_blas_library()
    with ops.use_backend("triton"):
        graphed = _generate(model, "hf_flash", ids, mask)
        eager = _generate(model, "hf_flash", ids, mask, disable_compile=True)
    want = _generate(model, reference, ids, mask)
    assert torch.equal(graphed.sequences, want.sequences)
    assert torch.equal(eager.sequences, want.sequences)
    step_graphs = captured_graphs(cache_of(graphed))
    assert sorted(key[2] for key in step_graphs) == [1, 2, 4]  # the split buckets the steps went through
    assert not captured_graphs(cache_of(eager))
    if device == "cuda":
        assert all(g.graph is not None for g in step_graphs.values())
    assert torch.backends.cuda.preferred_blas_library() == blas_library  # the steps' library was set for them only


@pytest.mark.cuda
def test_the_step_blas_library_is_set_for_the_step_only():
    """Inside ``step_blas_library`` matmuls go to the step's library; after it, also after an exception, to the one
    preferred before (whatever the user chose)."""
    original = torch.backends.cuda.preferred_blas_library()
    before = torch.backends.cuda.preferred_blas_library("cublas")
    try:
        with graphs.step_blas_library():
            assert torch.backends.cuda.preferred_blas_library().name.lower() == graphs.STEP_BLAS_LIBRARY
        assert torch.backends.cuda.preferred_blas_library() == before
        with pytest.raises(KeyboardInterrupt), graphs.step_blas_library():
            raise KeyboardInterrupt
        assert torch.backends.cuda.preferred_blas_library() == before
    finally:
        torch.backends.cuda.preferred_blas_library(original)


def test_a_torch_without_the_step_blas_library_keeps_its_own_and_says_so(caplog, monkeypatch):
    """A build that refuses the library (as torch's CPU builds refuse cuBLASLt): the step runs on with the library
    preferred before, and the reason is logged once."""
    monkeypatch.setattr(graphs, "STEP_BLAS_LIBRARY", "no such library")
    transformers.utils.logging.warning_once.cache_clear()
    before = torch.backends.cuda.preferred_blas_library()
    with caplog.at_level(logging.WARNING, logger="hf_flash"):
        for _ in range(2):
            with graphs.step_blas_library():
                assert torch.backends.cuda.preferred_blas_library() == before
    lines = [r.getMessage() for r in caplog.records if "no such library" in r.getMessage()]
    assert len(lines) == 1 and before.name in lines[0], lines
    assert torch.backends.cuda.preferred_blas_library() == before


def test_steps_that_graphs_do_not_cover_run_eagerly(graphs_on_any_device):
    """A step asking for hidden states, and a cache made with cuda_graphs=False: eager steps, no graph, same tokens."""
    model, reference = tiny_model("llama")
    ids, mask = left_padded_batch([8, 5])
    want = _generate(model, reference, ids, mask, new=6, output_hidden_states=True)
    got = _generate(model, "hf_flash", ids, mask, new=6, output_hidden_states=True)
    assert torch.equal(got.sequences, want.sequences) and not captured_graphs(cache_of(got))
    cache = PagedCache(model.config, cuda_graphs=False)
    got = _generate(model, "hf_flash", ids, mask, new=6, cache=cache)
    assert torch.equal(got.sequences, _generate(model, reference, ids, mask, new=6).sequences)
    assert not captured_graphs(cache)


# Run in a child process: a failed capture leaves torch's CUDA random generator unusable in its process.
_UNCAPTURABLE = """
import torch
from test_models import left_padded_batch, tiny_model
import hf_flash
from hf_flash.internals import CACHE_NAME

model, _ = tiny_model("llama")
model.to("cuda").set_attn_implementation("hf_flash")
ids, mask = (t.cuda() for t in left_padded_batch([9, 6]))
model.model.layers[0].register_forward_hook(lambda module, args, output: print(output[0].sum().item(), end=""))
cache = hf_flash.PagedCache(model.config)
try:
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                   **{CACHE_NAME: cache})
except RuntimeError as e:
    print("\\n" + str(e))
print("\\nlengths", cache.page_table.lengths, cache.get_seq_length())
"""


@pytest.mark.cuda
def test_a_step_that_cannot_be_captured_says_how_to_decode_eagerly():
    """A host sync inside the forward (a hook calling .item()) makes the capture fail: generate() raises, naming the
    two ways to decode eagerly, and the caller's cache is as it was before the call (generate() is a transaction)."""
    child = subprocess.run([sys.executable, "-c", _UNCAPTURABLE], capture_output=True, text=True, timeout=300,
                           check=False, cwd=os.path.dirname(__file__))
    assert "could not capture this model's decode step" in child.stdout, child.stdout + child.stderr
    assert "disable_compile=True" in child.stdout and "cuda_graphs=False" in child.stdout
    assert "lengths [] 0" in child.stdout, child.stdout


def _generate_with_forward_widths(model, ids, mask, new, **kwargs):
    """hf_flash's generate() on the torch backend, and the width of the input ids of each of its forward calls."""
    widths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        with ops.use_backend("torch"):
            return _generate(model, "hf_flash", ids, mask, new=new, **kwargs), widths
    finally:
        hook.remove()


def test_long_prompts_are_prefilled_in_chunks(monkeypatch):
    """A chunk budget of 48 tokens over 3 sequences prefills 16 columns at a time: left-padded prompts of 40, 23
    and 9 tokens take 3 forward calls (the first chunks are all padding for the short ones), tokens equal sdpa's."""
    monkeypatch.setattr(generate_patch, "PREFILL_CHUNK_TOKENS", 48)
    model, reference = tiny_model("qwen3")
    ids, mask = left_padded_batch([40, 23, 9])
    got, widths = _generate_with_forward_widths(model, ids, mask, new=12)
    assert widths[:4] == [16, 16, 8, 1]
    assert torch.equal(got.sequences, _generate(model, reference, ids, mask, new=12).sequences)
    assert cache_of(got).page_table.lengths == [40 + 11, 23 + 11, 9 + 11]


@pytest.mark.parametrize("lengths, widths", [([40], [32, 8, 1]), ([39], [39, 1]), ([20, 20], [16, 4, 1]),
                                             ([19, 19], [19, 1])])
def test_long_prompts_are_prefilled_in_two_chunks_at_least(monkeypatch, lengths, widths):
    """From TWO_CHUNKS_FROM tokens over the batch (set to 40 here) prompts that the budget would prefill whole take
    two chunks of whole pages: one prompt of 40 tokens takes 32 then 8, two of 20 take 16 then 4; 39 tokens over the
    batch take one call. Tokens equal sdpa's."""
    monkeypatch.setattr(generate_patch, "TWO_CHUNKS_FROM", 40)
    model, reference = tiny_model("qwen3")
    ids, mask = left_padded_batch(lengths)
    got, seen = _generate_with_forward_widths(model, ids, mask, new=4)
    assert seen[:len(widths)] == widths
    assert torch.equal(got.sequences, _generate(model, reference, ids, mask, new=4).sequences)


def test_a_long_next_turn_is_prefilled_whole_and_says_so(monkeypatch, caplog):
    """A chat's next turn on a caller's cache holding tokens: transformers 5.17 would chunk the whole conversation's
    ids, history included, so the tokens the cache lacks go in one forward, and the log says so; sdpa's tokens."""
    monkeypatch.setattr(generate_patch, "TWO_CHUNKS_FROM", 40)
    transformers.utils.logging.warning_once.cache_clear()
    model, reference = tiny_model("qwen3")
    ids, mask = left_padded_batch([9])
    cache, dynamic = PagedCache(model.config, page_size=4), transformers.DynamicCache(config=model.config)
    first = _generate(model, "hf_flash", ids, mask, new=4, **{CACHE_NAME: cache}).sequences
    assert torch.equal(first, _generate(model, reference, ids, mask, new=4, **{CACHE_NAME: dynamic}).sequences)
    turn = torch.cat([first, torch.randint(1, 128, (1, 40))], 1)  # 41 tokens the cache lacks: the last answer's too
    with caplog.at_level(logging.WARNING, logger="hf_flash"):
        got, seen = _generate_with_forward_widths(model, turn, torch.ones_like(turn), new=4, **{CACHE_NAME: cache})
    assert seen[:2] == [41, 1]
    assert any("next turn on a PagedCache holding tokens is prefilled in one forward" in r.getMessage()
               for r in caplog.records)
    want = _generate(model, reference, turn, torch.ones_like(turn), new=4, **{CACHE_NAME: dynamic})
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("asked", ["output_hidden_states", "output_attentions"])
def test_prompts_are_prefilled_whole_when_their_per_token_outputs_are_asked_for(monkeypatch, asked):
    """transformers' chunked prefill returns the last chunk's hidden states and attentions only: asked for them, a
    long prompt is prefilled in one call, and the prompt's hidden states are sdpa's, every position of them."""
    monkeypatch.setattr(generate_patch, "TWO_CHUNKS_FROM", 40)
    model, reference = tiny_model("qwen3")
    ids, mask = left_padded_batch([40])
    got, seen = _generate_with_forward_widths(model, ids, mask, new=4, **{asked: True})
    want = _generate(model, reference, ids, mask, new=4, **{asked: True})
    assert seen[:2] == [40, 1]
    assert torch.equal(got.sequences, want.sequences)
    if asked == "output_hidden_states":
        assert len(got.hidden_states[0]) == len(want.hidden_states[0])
        for g, w in zip(got.hidden_states[0], want.hidden_states[0]):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=0)  # fp32: summation order only


def test_compile_criteria_for_a_paged_cache():
    """generate() replays graphs for a PagedCache on CUDA only, unless disable_compile or cuda_graphs=False; other
    caches keep transformers' own answer."""
    model, _ = tiny_model("llama")
    config = transformers.GenerationConfig()
    paged = {CACHE_NAME: PagedCache(model.config)}
    on_cuda = model.device.type == "cuda"
    assert model._valid_auto_compile_criteria(paged, config) is on_cuda
    assert not model._valid_auto_compile_criteria({CACHE_NAME: PagedCache(model.config, cuda_graphs=False)},
                                                  config)
    assert not model._valid_auto_compile_criteria(paged, transformers.GenerationConfig(disable_compile=True))
    dynamic = {CACHE_NAME: transformers.DynamicCache()}
    assert model._valid_auto_compile_criteria(dynamic, config) == generate_patch._original_compile_criteria(
        model, dynamic, config)


def test_weights_moved_since_a_capture_get_new_graphs(device, graphs_on_any_device):
    """A captured step reads the weights where they were: after they are assigned anew (new tensors, new values), the
    next generate() on the same pools (the default cache takes over the last call's) must not replay those graphs.
    Its tokens are sdpa's with the new weights, and it keys its own graphs."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([9, 6]))
    before = graphs.model_key(model)
    assert graphs.model_key(model) == before
    pools = cache_of(_generate(model, "hf_flash", ids, mask, new=8)).layers[0].keys  # its cache is gone: kept
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data * 1.5  # new storage: the old is freed and may be reused
    assert graphs.model_key(model) != before
    want = _generate(model, reference, ids, mask, new=8)
    got = _generate(model, "hf_flash", ids, mask, new=8)
    assert torch.equal(got.sequences, want.sequences)
    assert cache_of(got).layers[0].keys is pools  # the same pools, other graphs
    assert len({key[0] for key in captured_graphs(cache_of(got))}) == 2


def test_graph_keys_tell_models_apart_without_keeping_them():
    """A graph key holds a number per model that no later model gets: not ``id(model)``, which a later model can take
    (its steps would replay graphs that read the first one's freed weights), nor the model (the graphs would keep it
    alive)."""
    first = torch.nn.Linear(1, 1)
    number, alive = graphs._model_number(first), weakref.ref(first)
    assert graphs._model_number(first) == number
    del first
    gc.collect()
    assert alive() is None
    later = [torch.nn.Linear(1, 1) for _ in range(64)]  # some may take the first one's id
    assert number not in {graphs._model_number(m) for m in later}

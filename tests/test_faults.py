"""Faults injected into generate() over a caller's PagedCache: an exception, an interrupt or an out-of-memory error at
each layer, inside hf_flash's attention (after the layer's tokens were written) or outside it (in the MLP), in the
prefill and in a decode step, eagerly and through the decode-step runner (CUDA graphs on a GPU). The cache must be
exactly as before the failed call, and retrying the turn must give sdpa's tokens from scratch. Also: a cache reused
with a model it does not fit, and bad batch indices, are refused with nothing changed."""
import pytest
import torch
import transformers
from test_cache import CACHE_NAME, _generate
from test_models import left_padded_batch, tiny_model

from hf_flash import PagedCache, graphs, ops
from hf_flash.graphs import captured_graphs
from hf_flash.patches import generate as generate_patch

pytestmark = pytest.mark.usefixtures("torch_path_on_cpu")

LAYERS = 3
FAULTS = {"error": RuntimeError, "interrupt": KeyboardInterrupt, "oom": torch.OutOfMemoryError}


class Injected(Exception):
    pass


def _model(device):
    model, reference = tiny_model("mistral")  # sliding window 8: the window matters over these lengths
    config = model.config
    config.num_hidden_layers = LAYERS
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=reference).eval().to(device)
    return model, reference


def _turns(device):
    ids, mask = (t.to(device) for t in left_padded_batch([11, 6]))
    return ids, mask, torch.randint(1, 128, (2, 5), device=device)


def _second_turn(first, mask, more):
    turn = torch.cat([first, more], dim=1)
    return turn, torch.cat([mask, torch.ones_like(turn[:, mask.shape[1]:])], dim=1)


class FailOnce:
    """Raise ``fault`` at the ``call``-th call counted by ``hit()`` (after the wrapped work ran), once."""

    def __init__(self, fault, call):
        self.fault, self.call, self.calls = fault, call, 0

    def hit(self):
        self.calls += 1
        if self.calls == self.call:
            raise self.fault("injected")


@pytest.fixture(params=["eager", "runner"])
def decode_path(request, monkeypatch):
    """``runner``: decode steps go through hf_flash's loop and ``graphs.run_step`` (CUDA graphs on a GPU, its static
    buffers eagerly on CPU), uncompiled: the faults are injected by Python hooks, which a compiled step runs only while
    dynamo traces it (test_decoding interrupts a compiled step in the runner)."""
    if request.param == "runner":
        monkeypatch.setattr(generate_patch, "graphs_run_on", lambda device: True)
        monkeypatch.setattr(graphs, "COMPILE_BACKENDS", {})
        return {}
    return {"disable_compile": True}


# (layer, phase, site, fault): every layer, phase, site and fault, each site with each phase.
CASES = [(0, "prefill", "attention", "error"), (LAYERS - 1, "prefill", "mlp", "interrupt"),
         (1, "prefill", "mlp", "oom"), (1, "decode", "attention", "error"),
         (LAYERS - 1, "decode", "attention", "oom"), (0, "decode", "mlp", "error"),
         (LAYERS - 1, "prefill", "attention", "interrupt"), (0, "decode", "attention", "interrupt"),
         (0, "prefill", "mlp", "oom"), (LAYERS - 1, "decode", "mlp", "oom")]


@pytest.mark.parametrize(("layer", "phase", "site", "fault"), CASES)
def test_a_failed_turn_leaves_the_cache_as_it_was(layer, phase, site, fault, decode_path, device, monkeypatch):
    model, reference = _model(device)
    ids, mask, more = _turns(device)
    cache = PagedCache(model.config, page_size=4)
    first = _generate(model, "hf_flash", ids, mask, new=6, do_sample=False, cache=cache, **decode_path)
    turn, turn_mask = _second_turn(first, mask, more)
    captured_graphs(cache).clear()  # on a GPU the first turn's graphs would replay the decode steps, where no hook runs
    before = cache.snapshot()

    # Layer `layer`'s call in the turn's prefill (its 1st forward) or its first decode step (2nd forward: on a GPU the
    # runner's eager step before a capture; hooks raise nowhere else, as replays run no Python).
    fail = FailOnce(FAULTS[fault], 1 if phase == "prefill" else 2)
    if site == "attention":  # inside hf_flash's attention function, after the layer's tokens were written
        write, calls = ops.write_kv_pages, iter(range(10**6))

        def write_then_fail(*args, **kwargs):
            write(*args, **kwargs)
            if next(calls) % LAYERS == layer:
                fail.hit()

        monkeypatch.setattr(ops, "write_kv_pages", write_then_fail)
    else:  # outside it, after the layer attended
        model.model.layers[layer].mlp.register_forward_pre_hook(lambda module, args: fail.hit())
    with pytest.raises(FAULTS[fault], match="injected"):
        _generate(model, "hf_flash", turn, turn_mask, new=7, do_sample=False, cache=cache, **decode_path)
    assert fail.calls == fail.call
    assert cache.snapshot() == before  # exactly as before the failed call
    # A step whose first run failed runs first again: capturing it next would compile it inside the capture.
    assert not any(g.warm or g.graph for g in captured_graphs(cache).values())
    if site == "attention":
        monkeypatch.setattr(ops, "write_kv_pages", write)
    model._forward_pre_hooks.clear()
    for module in model.modules():
        module._forward_pre_hooks.clear()

    retried = _generate(model, "hf_flash", turn, turn_mask, new=7, do_sample=False, cache=cache, **decode_path)
    dynamic = transformers.DynamicCache(config=model.config)
    want_first = _generate(model, reference, ids, mask, new=6, do_sample=False, cache=dynamic)
    want = _generate(model, reference, *_second_turn(want_first, mask, more), new=7, do_sample=False, cache=dynamic)
    assert torch.equal(first, want_first) and torch.equal(retried, want)


def _stored_keys(cache):
    """Every layer's stored keys, each sequence's gathered through its pages."""
    table = cache.page_table
    return [[layer.keys[torch.tensor(pages)].flatten(0, 1)[:n] for pages, n in zip(table.pages, table.lengths)]
            for layer in cache.layers]


def test_a_failed_beam_search_turn_leaves_the_stored_tokens_as_they_were(device):
    """Beam search drops beams mid-call (a fork): their pages were freed and written over by the next steps, so a
    failed turn gave back page lists whose contents had changed. The transaction holds them: after the failure the
    cache stores exactly the same K/V, and a retried turn gives the uninterrupted turn's tokens."""
    model, reference = _model(device)
    ids, mask, more = _turns(device)
    options = {"new": 8, "num_beams": 2, "do_sample": False}

    class FailAtCall(transformers.LogitsProcessor):
        def __init__(self, call):
            self.fail = FailOnce(KeyboardInterrupt, call)

        def __call__(self, input_ids, scores):
            self.fail.hit()
            return scores

    cache = PagedCache(model.config, page_size=4)
    first = _generate(model, "hf_flash", ids[:1], mask[:1], cache=cache, **options)  # two beams' rows left
    turn, turn_mask = _second_turn(first, mask[:1], more[:1])
    before, stored = cache.snapshot(), _stored_keys(cache)
    with pytest.raises(KeyboardInterrupt, match="injected"):
        _generate(model, "hf_flash", turn, turn_mask, cache=cache, logits_processor=[FailAtCall(6)], **options)
    assert cache.snapshot() == before
    assert all(torch.equal(a, b) for layer_a, layer_b in zip(stored, _stored_keys(cache))
               for a, b in zip(layer_a, layer_b, strict=True))
    retried = _generate(model, "hf_flash", turn, turn_mask, cache=cache, **options)
    dynamic = transformers.DynamicCache(config=model.config)
    want_first = _generate(model, reference, ids[:1], mask[:1], cache=dynamic, **options)
    want = _generate(model, reference, *_second_turn(want_first, mask[:1], more[:1]), cache=dynamic, **options)
    assert torch.equal(first, want_first) and torch.equal(retried, want)


def test_a_forward_that_raises_outside_hf_flash_is_undone_when_the_cache_is_next_used(device):
    """A plain forward (no generate()) that raises after some layers stored: the next forward aborts that step first,
    and reads in between see the last committed step."""
    model, _ = _model(device)
    model.set_attn_implementation("hf_flash")
    ids, mask = (t.to(device) for t in left_padded_batch([7, 4]))
    cache = PagedCache(model.config, page_size=4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{CACHE_NAME: cache})
        before = cache.snapshot()
        hook = model.model.layers[1].mlp.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(Injected))
        step = torch.randint(1, 128, (2, 1), device=device)
        step_mask = torch.cat([mask, torch.ones_like(step)], 1)
        with pytest.raises(Injected):
            model(input_ids=step, attention_mask=step_mask, **{CACHE_NAME: cache})
        assert cache.get_seq_length() == 7
        hook.remove()
        assert cache.snapshot() == before
        model(input_ids=step, attention_mask=step_mask, **{CACHE_NAME: cache})
    assert cache.page_table.lengths == [8, 5] and cache.get_seq_length() == 8


@pytest.mark.parametrize("change", ["layers", "kv_heads", "head_dim"])
def test_a_cache_made_for_another_model_is_refused_before_any_change(change, device):
    model, _ = _model(device)
    ids, mask = (t.to(device) for t in left_padded_batch([5, 3]))
    cache = PagedCache(model.config, page_size=4)
    _generate(model, "hf_flash", ids, mask, new=3, do_sample=False, cache=cache)
    before = cache.snapshot()
    config = model.config.to_dict()
    config.update({"layers": {"num_hidden_layers": LAYERS + 1}, "kv_heads": {"num_key_value_heads": 1},
                   "head_dim": {"head_dim": 8}}[change])
    other = transformers.AutoModelForCausalLM.from_config(type(model.config).from_dict(config)).eval().to(device)
    with pytest.raises(ValueError, match="another model|made for a model with|PagedCache per model"):
        _generate(other, "hf_flash", ids, mask, new=3, do_sample=False, cache=cache)
    assert cache.snapshot() == before


@pytest.mark.parametrize(("method", "bad", "error", "match"), [
    ("reorder_cache", torch.tensor([0, -1]), ValueError, r"beam_idx must be >= 0"),
    ("reorder_cache", torch.tensor([0, 2]), IndexError, r"beam_idx \[0, 2\] out of range"),
    ("reorder_cache", torch.tensor([0.0, 1.0]), ValueError, "beam_idx must be a 1-D sequence of ints"),
    ("batch_select_indices", torch.tensor([True, False, True]), ValueError, r"bool mask must have shape \(2,\)"),
    ("batch_select_indices", [5], IndexError, "indices"),
    ("batch_select_indices", [], ValueError, "selects no sequence"),
    ("batch_repeat_interleave", 0, ValueError, "repeats must be a positive int"),
    ("batch_repeat_interleave", 2.0, ValueError, "repeats must be a positive int"),
    ("crop", 1.5, ValueError, "max_length must be an int"),
])
def test_bad_batch_operations_change_nothing(method, bad, error, match):
    model, _ = _model("cpu")
    ids, mask = left_padded_batch([5, 3])
    cache = PagedCache(model.config, page_size=4)
    _generate(model, "hf_flash", ids, mask, new=2, do_sample=False, cache=cache)
    before = cache.snapshot()
    with pytest.raises(error, match=match):
        getattr(cache, method)(bad)
    assert cache.snapshot() == before
    cache.batch_select_indices(torch.tensor([False, True]))  # a bool mask selects, as with DynamicCache
    assert cache.page_table.lengths == [before.lengths[1]]

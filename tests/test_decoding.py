"""hf_flash's decode loop (``hf_flash.decoding``): greedy search and sampling over a PagedCache, each step (forward and
token choice) through ``hf_flash.graphs.run_step``, against transformers' sdpa + DynamicCache, fp32, token for token.
On CPU the steps run on the same static buffers, uncompiled unless a test compiles them (aot_eager: dynamo's capture
and AOT functionalization without code generation); on a GPU they are compiled by inductor and replayed as graphs."""
import gc
import logging
import weakref

import pytest
import torch
import transformers
from test_cache import cache_of
from test_models import left_padded_batch, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend

import hf_flash
from hf_flash import PagedCache, graphs
from hf_flash.graphs import captured_graphs
from hf_flash.internals import CACHE_NAME
from hf_flash.patches import generate as generate_patch

pytestmark = pytest.mark.usefixtures("torch_path_on_cpu")


@pytest.fixture(autouse=True)
def graphs_on_any_device(monkeypatch):
    """Let generate() take hf_flash's loop on CPU too."""
    monkeypatch.setattr(generate_patch, "graphs_run_on", lambda device: True)


def _generate(model, impl, ids, mask, **kwargs):
    model.set_attn_implementation(impl)
    kwargs.setdefault("max_new_tokens", 12)
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, return_dict_in_generate=True, **kwargs)


def _steps_of_the_loop(cache):
    """The graph keys of hf_flash's loop (not of transformers' loop's forwards) held for ``cache``."""
    return [key for key in captured_graphs(cache) if key[3][0] == "decode"]


def _same_tokens_as_sdpa(model, reference, ids, mask, options):
    """generate() with hf_flash and with sdpa from one seed: the same tokens, hf_flash's through its loop. Returns
    hf_flash's output."""
    seed = torch.seed()
    torch.manual_seed(seed)
    want = _generate(model, reference, ids, mask, **options).sequences
    torch.manual_seed(seed)
    got = _generate(model, "hf_flash", ids, mask, **options)
    assert torch.equal(got.sequences, want)
    assert _steps_of_the_loop(cache_of(got))
    return got


SAMPLING = {
    "greedy": {"do_sample": False},
    "temperature": {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0},
    "top-k": {"do_sample": True, "top_k": 5},
    "top-p": {"do_sample": True, "top_p": 0.8, "top_k": 0, "temperature": 1.3},
    "min-p": {"do_sample": True, "min_p": 0.1, "top_k": 0},
}


@pytest.mark.parametrize("options", SAMPLING.values(), ids=SAMPLING.keys())
def test_loop_matches_sdpa(options, device):
    """Left-padded prompts, greedy or sampled from one seed: the tokens of sdpa + DynamicCache, and every step after
    the first from hf_flash's loop (one graph key: one batch, one split count)."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([11, 6, 3]))
    got = _same_tokens_as_sdpa(model, reference, ids, mask, options)
    assert len(_steps_of_the_loop(cache_of(got))) == 1


def test_eos_pads_finished_sequences_and_stops(device):
    """An EOS that some sequences reach early: they get padding after it, the loop stops when all have (before
    max_new_tokens), as transformers' loop does, and the cache holds what transformers' would. The EOS is the token
    the first sequence picks at its third step."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([9, 5, 7]))
    free = _generate(model, reference, ids, mask, do_sample=False, eos_token_id=None, max_new_tokens=20).sequences
    eos = int(free[0, ids.shape[1] + 2])
    want = _generate(model, reference, ids, mask, do_sample=False, eos_token_id=eos, max_new_tokens=20).sequences
    got = _generate(model, "hf_flash", ids, mask, do_sample=False, eos_token_id=eos, max_new_tokens=20)
    assert torch.equal(got.sequences, want)
    assert (got.sequences[0, ids.shape[1] + 3:] == 0).all()  # padding after the EOS
    assert _steps_of_the_loop(cache_of(got))
    # The first sequence alone stops at the EOS; the step queued past it (the verdict comes a step late) is undone:
    # the cache holds every token but the last, as after transformers' loop.
    want = _generate(model, reference, ids[:1], mask[:1], do_sample=False, eos_token_id=eos, max_new_tokens=20)
    got = _generate(model, "hf_flash", ids[:1], mask[:1], do_sample=False, eos_token_id=eos, max_new_tokens=20)
    assert torch.equal(got.sequences, want.sequences) and got.sequences.shape[1] == ids.shape[1] + 3
    assert cache_of(got).get_seq_length() == got.sequences.shape[1] - 1


class _StopAtTwelve(transformers.MaxLengthCriteria):
    """A MaxLengthCriteria of the caller's own that stops earlier than its max_length says (and answers in ints)."""

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), int(input_ids.shape[1] >= 12), device=input_ids.device)


@pytest.mark.parametrize("criterion", [transformers.MaxLengthCriteria(12), transformers.MaxLengthCriteria(40),
                                       _StopAtTwelve(99)], ids=["shorter", "longer", "subclass-in-ints"])
def test_a_callers_length_criterion_is_followed(criterion, device):
    """A caller's MaxLengthCriteria replaces generate()'s own (max_new_tokens=20: 29 tokens here), whether it stops
    sooner or later; a subclass's verdict is read as any criterion's. sdpa's tokens and length, from the loop."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([9, 5]))
    options = {"do_sample": False, "max_new_tokens": 20, "eos_token_id": None,
               "stopping_criteria": transformers.StoppingCriteriaList([criterion])}
    want = _generate(model, reference, ids, mask, **options).sequences
    got = _generate(model, "hf_flash", ids, mask, **options)
    assert torch.equal(got.sequences, want) and got.sequences.is_contiguous()
    assert _steps_of_the_loop(cache_of(got))


def test_a_pool_holding_exactly_the_calls_tokens_suffices(device):
    """The loop queues a step before it reads whether the last one finished every sequence; in a caller's pool with no
    page left for that step past the end, it reads the verdict first, as transformers' loop would, and the call ends
    at the EOS with sdpa's tokens (and a contiguous output, which a caller may view)."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = torch.randint(1, 128, (1, 8), device=device), torch.ones(1, 8, dtype=torch.long, device=device)
    free = _generate(model, reference, ids, mask, do_sample=False, eos_token_id=None, max_new_tokens=10).sequences
    eos = int(free[0, 8 + 4])  # the fifth new token
    assert eos not in free[0, 8:12].tolist()
    options = {"do_sample": False, "eos_token_id": eos, "max_new_tokens": 10}
    want = _generate(model, reference, ids, mask, **options).sequences
    cache = PagedCache(model.config, page_size=4, num_pages=3)  # 12 slots: the prompt and the 4 new tokens stored
    got = _generate(model, "hf_flash", ids, mask, **options, **{CACHE_NAME: cache})
    assert torch.equal(got.sequences, want) and got.sequences.view(-1).numel() == 13
    assert _steps_of_the_loop(cache) and cache.get_seq_length() == 12


def test_streamer_gets_every_token(device):
    """A streamer sees the prompt, then each new token once, then the end."""
    model, _ = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([7]))

    class Recorder(transformers.generation.BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            self.ended = True

    streamer = Recorder()
    got = _generate(model, "hf_flash", ids, mask, do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.tokens == got.sequences[0].tolist() and streamer.ended


def test_chat_continues_on_a_callers_cache(device):
    """Two turns on one PagedCache (the second prompt is the whole conversation, as a chat template gives it): the
    second turn's tokens equal sdpa's over the whole conversation, and its steps run through hf_flash's loop."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([8]))
    cache = PagedCache(model.config, page_size=4)
    first = _generate(model, "hf_flash", ids, mask, do_sample=False, eos_token_id=None, **{CACHE_NAME: cache})
    turn = torch.cat([first.sequences, torch.randint(1, 128, (1, 5), device=device)], 1)
    turn_mask = torch.ones_like(turn)
    got = _generate(model, "hf_flash", turn, turn_mask, do_sample=False, eos_token_id=None, **{CACHE_NAME: cache})
    want = _generate(model, reference, turn, turn_mask, do_sample=False, eos_token_id=None)
    assert torch.equal(got.sequences, want.sequences)
    assert cache.page_table.lengths == [turn.shape[1] + 11]


def test_a_next_turn_hiding_stored_tokens_is_refused(device):
    """A batched chat where one sequence stops at an EOS: the pad tokens generate() gives it afterwards are fed to the
    model and stored. A next turn whose mask hides them (``ids != pad``, what transformers infers without a mask)
    cannot be honoured by a PagedCache, whose kernels attend every stored token: refused, naming the mask, with the
    cache as it was. With the mask of the first turn (the pads visible) the turn goes on, with sdpa's tokens."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([9, 6]))
    free = _generate(model, reference, ids, mask, do_sample=False, eos_token_id=None).sequences
    eos = int(free[0, ids.shape[1] + 1])  # the first sequence stops at its second new token
    assert eos not in free[1, ids.shape[1]:].tolist()
    options = {"do_sample": False, "eos_token_id": eos, "max_new_tokens": 6}
    cache, dynamic = PagedCache(model.config, page_size=4), transformers.DynamicCache(config=model.config)
    first = _generate(model, "hf_flash", ids, mask, **options, **{CACHE_NAME: cache})
    want = _generate(model, reference, ids, mask, **options, **{CACHE_NAME: dynamic})
    assert torch.equal(first.sequences, want.sequences)
    assert (first.sequences[0, ids.shape[1] + 2:] == 0).all()  # padding after the EOS, stored in the cache
    turn = torch.cat([first.sequences, torch.randint(1, 128, (2, 3), device=device)], 1)
    before = cache.snapshot()
    refused = r"attention_mask leaves \[\d+, \d+\] of the \d+ positions .* the mask must hide"
    with pytest.raises(ValueError, match=refused):
        _generate(model, "hf_flash", turn, (turn != 0).long(), **{CACHE_NAME: cache})
    assert cache.snapshot() == before
    history = torch.cat([mask, torch.ones((2, turn.shape[1] - mask.shape[1]), dtype=mask.dtype, device=device)], 1)
    got = _generate(model, "hf_flash", turn, history, do_sample=False, eos_token_id=None, **{CACHE_NAME: cache})
    want = _generate(model, reference, turn, history, do_sample=False, eos_token_id=None, **{CACHE_NAME: dynamic})
    assert torch.equal(got.sequences, want.sequences)


def test_steps_under_inference_mode_leave_buffers_a_next_call_can_write(device):
    """A call under torch.inference_mode() through hf_flash's loop makes the step's static buffers and the pools; a
    chat's next turn outside it on the caller's cache, and a next call without a cache taking over the kept pools and
    graphs, write them: sdpa's tokens."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([7, 4]))
    greedy = {"do_sample": False, "eos_token_id": None}
    with torch.inference_mode():
        inside = _same_tokens_as_sdpa(model, reference, ids, mask, greedy)
    del inside
    _same_tokens_as_sdpa(model, reference, ids, mask, greedy)  # takes over the kept pools and graphs
    cache, dynamic = PagedCache(model.config, page_size=4), transformers.DynamicCache(config=model.config)
    with torch.inference_mode():
        first = _generate(model, "hf_flash", ids, mask, **greedy, **{CACHE_NAME: cache}).sequences
    assert _steps_of_the_loop(cache)
    turn = torch.cat([first, torch.randint(1, 128, (2, 3), device=device)], 1)
    turn_mask = torch.cat([mask, torch.ones_like(turn[:, mask.shape[1]:])], 1)
    got = _generate(model, "hf_flash", turn, turn_mask, **greedy, **{CACHE_NAME: cache})
    _generate(model, reference, ids, mask, **greedy, **{CACHE_NAME: dynamic})
    want = _generate(model, reference, turn, turn_mask, **greedy, **{CACHE_NAME: dynamic})
    assert torch.equal(got.sequences, want.sequences)


def test_a_call_without_a_cache_takes_over_the_last_ones_pools_and_graphs(device, caplog):
    """generate() without a cache, twice at one size, the first output dropped: the second call's cache takes over the
    first's pools and the step graphs captured over them, and gives sdpa's tokens. An output the caller keeps is not
    taken over (its cache is left as it was); a call of another size frees the kept pools; release_kept_pools too.
    Either miss is logged: new pools mean new graphs."""
    transformers.utils.logging.warning_once.cache_clear()
    caplog.set_level(logging.WARNING, logger="hf_flash")
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([9, 4]))
    greedy = {"do_sample": False, "eos_token_id": None}
    first = _same_tokens_as_sdpa(model, reference, ids, mask, greedy)
    pools, step_graphs = cache_of(first).layers[0].keys, dict(captured_graphs(cache_of(first)))
    del first  # the caller keeps nothing of the first call
    second = _same_tokens_as_sdpa(model, reference, ids, mask, greedy)
    assert cache_of(second).layers[0].keys is pools
    assert step_graphs and all(captured_graphs(cache_of(second))[key] is g for key, g in step_graphs.items())

    kept_cache = cache_of(second)  # kept by the caller: not taken over
    lengths, contents = list(kept_cache.page_table.lengths), pools.clone()
    third = _same_tokens_as_sdpa(model, reference, ids, mask, greedy)
    assert cache_of(third).layers[0].keys is not pools
    assert kept_cache.page_table.lengths == lengths and torch.equal(pools, contents)
    assert any("still holds that call's cache" in r.getMessage() for r in caplog.records)

    del second, kept_cache, pools, contents
    kept_pools = weakref.ref(cache_of(third).layers[0].keys)
    del third
    gc.collect()
    assert kept_pools() is not None  # kept for the next call of this size
    longer = _same_tokens_as_sdpa(model, reference, ids, mask, {**greedy, "max_new_tokens": 40})
    gc.collect()
    assert kept_pools() is None  # another size: not taken over, freed
    assert any("do not fit this cache" in r.getMessage() for r in caplog.records)
    kept_pools = weakref.ref(cache_of(longer).layers[0].keys)
    del longer
    hf_flash.release_kept_pools(model)
    gc.collect()
    assert kept_pools() is None


def test_a_call_without_a_cache_that_failed_leaves_its_pools_to_the_next(device, monkeypatch):
    """A step of a call given no cache raises: the next call takes over the failed call's pools (zeroed) and the graphs
    over them, and gives sdpa's tokens."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([7, 3]))
    greedy = {"do_sample": False, "eos_token_id": None}
    pools, run = [], graphs._run

    def failing_at_third_step(step, key, cache, *args):
        pools.append(cache.layers[0].keys)
        if len(pools) == 3:
            raise RuntimeError("injected")
        return run(step, key, cache, *args)

    monkeypatch.setattr(graphs, "_run", failing_at_third_step)  # fails once; every step before and after runs
    with pytest.raises(RuntimeError, match="injected"):
        _generate(model, "hf_flash", ids, mask, **greedy)
    gc.collect()  # the failed call's frames, which held its cache
    got = _same_tokens_as_sdpa(model, reference, ids, mask, greedy)
    assert cache_of(got).layers[0].keys is pools[0]
    assert len(pools) > 3 and all(p is pools[0] for p in pools[3:])  # the retry's steps ran through the runner


def test_what_the_loop_does_not_cover_runs_transformers_loop_and_says_why(device, caplog):
    """A processor that reads the ids (repetition penalty) or holds a tensor (suppressed tokens: a graph kept for
    the cache's next call would read it at its old address), extra outputs (scores) and a caller's positions that
    start elsewhere than transformers' (the loop's steps take theirs from the cache's counts): transformers' loop, the
    same tokens, the reason logged."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([8, 5]))
    shifted = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + 50  # a continuation whose context is elsewhere
    class LengthTemperature(transformers.TemperatureLogitsWarper):  # a scores-only processor's subclass reading ids
        def __call__(self, input_ids, scores):
            return scores / (self.temperature * 10 / input_ids.shape[-1])

    cases = [({"repetition_penalty": 1.3}, "RepetitionPenaltyLogitsProcessor"),
             ({"logits_processor": [LengthTemperature(0.7)]}, "LengthTemperature"),
             ({"suppress_tokens": [5, 6]}, "SuppressTokensLogitsProcessor"),
             ({"output_scores": True}, "output_scores asked for"),
             ({"position_ids": shifted}, "position_ids that do not end at")]
    for options, reason in cases:
        want = _generate(model, reference, ids, mask, do_sample=False, **options).sequences
        with caplog.at_level(logging.WARNING, logger="hf_flash"):
            got = _generate(model, "hf_flash", ids, mask, do_sample=False, **options)
        assert torch.equal(got.sequences, want)
        assert not _steps_of_the_loop(cache_of(got))
        assert any("transformers' loop" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_beam_search_says_its_steps_run_eagerly(device, caplog):
    """transformers' beam search calls the model itself, never its compiled call: no step of it is graphed, and the
    log says so (the tokens are sdpa's)."""
    model, reference = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([8, 5]))
    want = _generate(model, reference, ids, mask, do_sample=False, num_beams=2).sequences
    with caplog.at_level(logging.WARNING, logger="hf_flash"):
        got = _generate(model, "hf_flash", ids, mask, do_sample=False, num_beams=2)
    assert torch.equal(got.sequences, want)
    assert not captured_graphs(cache_of(got))
    assert any("beam search runs its decode steps eagerly" in r.getMessage() for r in caplog.records)


def test_steps_that_run_eagerly_are_said(device, caplog, monkeypatch):
    """What hf_flash's compiled loop and CUDA graphs do not cover is logged: assisted decoding's candidate checks
    (several tokens a sequence), and every step on a device without CUDA graphs. The tokens are sdpa's."""
    model, reference = tiny_model("llama")
    model.to(device)
    assistant, _ = tiny_model("llama")
    assistant.to(device).set_attn_implementation("hf_flash")
    ids, mask = (t.to(device) for t in left_padded_batch([8]))
    want = _generate(model, reference, ids, mask, do_sample=False).sequences
    cases = [({"assistant_model": assistant}, "assisted decoding checks its candidates"),
             ({}, f"decode steps on {device} run eagerly")]
    for options, said in cases:
        if not options:  # as on a device without CUDA graphs
            monkeypatch.setattr(generate_patch, "graphs_run_on", lambda device: False)
        transformers.utils.logging.warning_once.cache_clear()
        with caplog.at_level(logging.WARNING, logger="hf_flash"):
            got = _generate(model, "hf_flash", ids, mask, do_sample=False, **options)
        assert torch.equal(got.sequences, want)
        assert any(said in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_an_interrupted_step_leaves_the_callers_cache_as_it_was(device, monkeypatch):
    """An interrupt in the fourth step of the loop, after the step ran (its tokens are in the pages): generate()
    raises it, the runner aborts the step, and the caller's cache holds exactly what it held before the call
    (generate() is a transaction). Injected in the runner, as a model hook would run only while the step is traced."""
    model, _ = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([6, 4]))
    cache = PagedCache(model.config, page_size=4)
    first = _generate(model, "hf_flash", ids, mask, do_sample=False, eos_token_id=None, max_new_tokens=3,
                      **{CACHE_NAME: cache})
    turn = torch.cat([first.sequences, torch.randint(1, 128, (2, 3), device=device)], 1)
    turn_mask = torch.cat([mask, torch.ones_like(turn[:, mask.shape[1]:])], 1)
    before = (list(cache.page_table.lengths), cache.get_seq_length(), cache.memory_stats()["pages_used"])
    steps, aborted = [], []

    def interrupted_at_fourth_step(*args):
        output = run(*args)
        steps.append(output)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return output

    run, abort = graphs._run, cache.abort_step
    monkeypatch.setattr(graphs, "_run", interrupted_at_fourth_step)
    monkeypatch.setattr(cache, "abort_step", lambda: aborted.append(True) or abort())
    with pytest.raises(KeyboardInterrupt):
        _generate(model, "hf_flash", turn, turn_mask, do_sample=False, eos_token_id=None, **{CACHE_NAME: cache})
    assert len(steps) == 4 and aborted == [True]
    assert (list(cache.page_table.lengths), cache.get_seq_length(), cache.memory_stats()["pages_used"]) == before
    # The retry, with the spies left in place (they interrupt only once): its steps run through the runner too.
    _generate(model, "hf_flash", turn, turn_mask, do_sample=False, eos_token_id=None, **{CACHE_NAME: cache})
    assert cache.page_table.lengths == (turn_mask.sum(-1) + 11).tolist()  # the retried turn, from where it was
    assert len(steps) > 4 and aborted == [True]


def test_the_whole_step_compiles_without_a_graph_break(monkeypatch):
    """The loop's step (forward over the PagedCache, processors, sampling) under torch.compile with the
    ``compile_config`` given to generate(): fullgraph=True (any graph break fails), aot_eager on CPU: the tokens of
    sdpa. A second generate() on a new cache reuses what the first compiled."""
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setitem(graphs.COMPILE_BACKENDS, "cpu", "inductor")  # the config's backend replaces it
    torch._dynamo.reset()
    model, reference = tiny_model("llama")
    ids, mask = left_padded_batch([11, 6, 3])
    options = {"do_sample": True, "top_k": 8, "temperature": 0.8,
               "compile_config": transformers.CompileConfig(backend=counter, fullgraph=True, dynamic=True)}
    try:
        _same_tokens_as_sdpa(model, reference, ids, mask, options)
        first = counter.frame_count
        _same_tokens_as_sdpa(model, reference, ids, mask, options)
    finally:
        torch._dynamo.reset()
    # One compile (dynamo may restart its trace once, after a shape it found static), none for the second call.
    assert 1 <= first <= 2 and counter.frame_count == first, (first, counter.frame_count)


def test_more_batch_sizes_than_torchs_recompile_limit_stay_compiled(monkeypatch):
    """Each batch size compiles the step anew; past torch's default of 8 compiles a function, dynamo would run every
    further one uncompiled, unsaid. The steps' own limit keeps the tenth batch size compiled."""
    counter = CompileCounterWithBackend("eager")
    monkeypatch.setitem(graphs.COMPILE_BACKENDS, "cpu", counter)
    monkeypatch.setattr(graphs, "_compiled", {})
    torch._dynamo.reset()
    model, _ = tiny_model("llama")
    try:
        for batch in range(1, 11):
            compiled_before = counter.frame_count
            ids = torch.randint(1, 128, (batch, 4))
            _generate(model, "hf_flash", ids, torch.ones_like(ids), do_sample=False, max_new_tokens=3)
            assert counter.frame_count > compiled_before, f"batch {batch} ran uncompiled"
    finally:
        torch._dynamo.reset()


def test_a_call_with_another_compile_config_gets_its_own_step_graphs(monkeypatch):
    """A caller's cache used again with another ``compile_config``: its steps run the function that config compiled
    (keyed apart), not the graphs captured for the first config, which on CUDA would replay the first compile."""
    compiled_with = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled_with.append(kwargs["options"]) or
                        (lambda *args: fn(*args)))
    monkeypatch.setattr(graphs, "_compiled", {})
    monkeypatch.setitem(graphs.COMPILE_BACKENDS, "cpu", "inductor")
    model, _ = tiny_model("llama")
    ids, mask = left_padded_batch([7, 4])
    cache = PagedCache(model.config, page_size=4)
    for options in ({"epilogue_fusion": True}, {"epilogue_fusion": False}):
        config = transformers.CompileConfig(options=options)
        out = _generate(model, "hf_flash", ids, mask, do_sample=False, compile_config=config, **{CACHE_NAME: cache})
        ids, mask = out.sequences, torch.cat([mask, torch.ones_like(out.sequences[:, mask.shape[1]:])], dim=1)
    assert [given["epilogue_fusion"] for given in compiled_with] == [True, False]
    assert len({key[3][-1] for key in _steps_of_the_loop(cache)}) == 2  # each config's compiled step


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_compile_config_reaches_torch_compile(monkeypatch, mode):
    """generate()'s CompileConfig sets the step's torch.compile: its mode's inductor options over hf_flash's own,
    its options over both, and never inductor's CUDA graphs (the runner captures the step itself)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    monkeypatch.setattr(graphs, "_compiled", {})
    monkeypatch.setitem(graphs.COMPILE_BACKENDS, "cpu", "inductor")
    config = transformers.CompileConfig(fullgraph=True, mode=mode, options={"epilogue_fusion": False})
    graphs.compiled(graphs.decode_step, torch.device("cpu"), config)
    graphs.compiled(graphs.decode_step, torch.device("cpu"), config)  # cached: compiled once
    graphs.compiled(graphs.decode_step, torch.device("cpu"))  # hf_flash's defaults: another wrapper
    (given, default), options = calls, calls[0]["options"]
    assert given["backend"] == "inductor" and given["fullgraph"] and given["dynamic"]
    assert options["fallback_random"] and not options["epilogue_fusion"] and not options["triton.cudagraphs"]
    assert options.get("max_autotune", False) == (mode == "max-autotune")
    assert default["options"] == {**graphs._INDUCTOR_OPTIONS, "triton.cudagraphs": False}
    assert default["options"]["triton.enable_pdl"]  # this torch's inductor has the option
    assert not default["fullgraph"]


def test_inductor_options_this_torch_lacks_are_left_out_and_said(caplog, monkeypatch):
    """An option of hf_flash's that this torch's inductor does not know (an older release) would make torch.compile
    raise: it is left out of the step's options, and the logger says so once."""
    monkeypatch.setitem(graphs._INDUCTOR_OPTIONS, "triton.no_such_option", True)
    transformers.utils.logging.warning_once.cache_clear()
    graphs.inductor_options.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="hf_flash"):
            options = graphs.inductor_options()
            assert graphs.inductor_options() is options  # asked once a process
    finally:
        graphs.inductor_options.cache_clear()  # the next caller sees the real options again
    assert options == {k: v for k, v in graphs._INDUCTOR_OPTIONS.items() if "no_such" not in k}
    lines = [r.getMessage() for r in caplog.records if "triton.no_such_option" in r.getMessage()]
    assert len(lines) == 1, lines

"""PagedCache: paged incremental decoding. generate() with a PagedCache against transformers' own attention and
DynamicCache (sdpa; eager for Gemma2) on tiny random models, pool exhaustion and growth, memory accounting, and the
page bookkeeping (reference counts, copy on write, batch ops, crop, reset) on its own. fp32 on CPU, torch path, but
for one test that runs the Triton kernels (interpreter).

The bookkeeping tests read the cache's page table (``page_table.pages``, ``.lengths``, ``.refs``): it is what is being
tested. Every step also checks the attention output against the float64 reference over the keys the test
itself stored, so wrong pages show up as wrong attention, not only as wrong lists."""
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from reference import attention_ref
from test_models import left_padded_batch, tiny_model

from hf_flash import PagedCache, PoolExhaustedError, ops
from hf_flash.integration import paged_attention_forward
from hf_flash.patches import generate as generate_patch
from hf_flash.internals import CACHE_NAME

NEW = 64  # new tokens per greedy generate


pytestmark = pytest.mark.usefixtures("torch_path_on_cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generate(model, impl, ids, mask, new=NEW, cache=None, **kwargs):
    """Greedy or sampled ``generate()`` of exactly ``new`` tokens; ``cache`` goes under the name this transformers
    release gives it (``past_key_values``, ``cache`` from 5.24)."""
    model.set_attn_implementation(impl)
    if cache is not None:
        kwargs[CACHE_NAME] = cache
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          pad_token_id=0, **kwargs)


def cache_of(output):
    """The cache a ``generate()`` or forward output holds."""
    return getattr(output, CACHE_NAME)


def _bytes_per_token(config):
    """K + V of one token in every layer, fp32, from the config (not from the cache)."""
    config = config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4


def _check_memory(cache, config, lengths, *, shared=False):
    """``lengths``: tokens each sequence must hold. Without sharing the pages are exactly ceil(tokens / page)."""
    stats = cache.memory_stats()
    page = cache.page_size
    pages = sum(math.ceil(n / page) for n in lengths)
    assert cache.page_table.lengths == lengths
    assert stats["tokens"] == sum(lengths)
    assert stats["bytes_per_token"] == _bytes_per_token(config)
    assert stats["bytes_used"] <= pages * page * _bytes_per_token(config)
    assert stats["pages_used"] + stats["pages_free"] == stats["pages_total"] == cache.num_pages
    if not shared:
        assert stats["pages_used"] == pages


# ------------------------------------------------------------------------------------------------ generate


GREEDY = ["llama", "mistral", "qwen3", "gemma2", "smollm2"]
# Prompt lengths per page size: 16 and 64 fill their pages exactly at prefill; 33 + 63 = 96 and 1 + 63 = 64 tokens
# are stored after 64 new tokens (the last one is never fed back), so those sequences end exactly on a page boundary.
PROMPTS = {16: [16, 33, 1], 64: [64, 33, 1]}


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("family", GREEDY)
def test_greedy_generate_matches_dynamic_cache(family, page_size, device):
    model, reference = tiny_model(family)
    model.to(device)
    lengths = PROMPTS[page_size]
    ids, mask = (t.to(device) for t in left_padded_batch(lengths))
    want = _generate(model, reference, ids, mask, do_sample=False)
    stored = [n + NEW - 1 for n in lengths]  # padding is never stored
    assert any(n % page_size == 0 for n in stored)
    assert getattr(model.config, "sliding_window", None) in (None, 8)  # Mistral, Gemma2: the window matters

    if page_size == 16:  # generate's own default cache for hf_flash (page size 16)
        out = _generate(model, "hf_flash", ids, mask, do_sample=False, return_dict_in_generate=True)
        assert type(cache_of(out)).__name__ == "PagedCache"
        assert torch.equal(out.sequences, want)
        _check_memory(cache_of(out), model.config, stored)

    # An explicit cache with exactly the pages the sequences need: one page too many allocated anywhere (at a page
    # boundary, for padding) would exhaust it.
    pages = sum(math.ceil(n / page_size) for n in stored)
    cache = PagedCache(model.config, page_size=page_size, num_pages=pages, grow=False)
    got = _generate(model, "hf_flash", ids, mask, do_sample=False, cache=cache)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1
    _check_memory(cache, model.config, stored)
    assert cache.memory_stats()["pages_free"] == 0


@pytest.mark.parametrize(("family", "first_turn_mode"), [("llama", contextlib.nullcontext),
                                                       ("mistral", contextlib.nullcontext),
                                                       ("llama", torch.inference_mode)],
                         ids=["llama", "mistral", "llama-first-turn-in-inference-mode"])
def test_a_second_generate_continues_the_cache(family, first_turn_mode, device):
    """A chat's next turn: the same cache passed again with the conversation so far plus new prompt tokens. Only the
    tokens the cache lacks are run (the last answer token and the new ones); the answer must equal DynamicCache's.
    Pools made under torch.inference_mode() are ordinary tensors, which a next turn outside it writes."""
    model, reference = tiny_model(family)
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([12, 5]))
    more = torch.randint(1, 128, (2, 6), device=device)
    outs = {}
    for impl, cache in ((reference, transformers.DynamicCache(config=model.config)),
                        ("hf_flash", PagedCache(model.config, page_size=4))):
        with first_turn_mode():
            first = _generate(model, impl, ids, mask, new=7, do_sample=False, cache=cache)
        turn = torch.cat([first, more], dim=1)
        outs[impl] = _generate(model, impl, turn, torch.cat([mask, torch.ones_like(turn[:, mask.shape[1]:])], dim=1),
                               new=9, do_sample=False, cache=cache)
        assert cache.get_seq_length() == turn.shape[1] + 9 - 1
    assert torch.equal(outs["hf_flash"], outs[reference])
    assert cache.page_table.lengths == [12 + 7 + 6 + 9 - 1, 5 + 7 + 6 + 9 - 1]  # pads never stored


def test_kept_pools_made_under_inference_mode_serve_the_next_call(device):
    """The next generate() outside inference mode takes over the kept pools of one made inside it, and writes them."""
    model, _ = tiny_model("llama")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([7, 4]))
    with torch.inference_mode():
        inside = _generate(model, "hf_flash", ids, mask, do_sample=False)
    assert torch.equal(_generate(model, "hf_flash", ids, mask, do_sample=False), inside)


def test_copies_and_pickles_of_a_cache_are_caches_of_their_own():
    """copy.deepcopy (transformers' recipe for reusing a prompt's cache) and pickle give a cache whose layers belong
    to it: the copy continues alone, with the original's tokens, and the original is untouched."""
    import copy
    import pickle

    model, _ = tiny_model("llama")
    ids, mask = left_padded_batch([9, 5])
    cache = PagedCache(model.config, page_size=4)
    first = _generate(model, "hf_flash", ids, mask, new=4, do_sample=False, cache=cache)
    before = cache.snapshot()
    turn = torch.cat([first, torch.randint(1, 128, (2, 3))], 1)
    turn_mask = torch.cat([mask, torch.ones(2, turn.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    results = []
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert all(layer.cache is clone for layer in clone.layers) and clone.snapshot() == before
        results.append(_generate(model, "hf_flash", turn, turn_mask, new=4, do_sample=False, cache=clone))
        assert clone.get_seq_length() == turn.shape[1] + 4 - 1 and cache.snapshot() == before
    assert torch.equal(results[0], results[1])
    assert torch.equal(_generate(model, "hf_flash", turn, turn_mask, new=4, do_sample=False, cache=cache), results[0])


def test_early_initialization_leaves_the_pools_to_the_first_step():
    """transformers' early_initialization (export, compiled chunked prefill) skips PagedCache's layers: their pools
    take the heads of the first key states (a tensor-parallel share), and a generate() after it runs as usual."""
    model, reference = tiny_model("llama")
    cache = PagedCache(model.config, page_size=4)
    cache.early_initialization(batch_size=2, num_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))
    assert not any(layer.is_initialized for layer in cache.layers)
    ids, mask = left_padded_batch([6, 3])
    got = _generate(model, "hf_flash", ids, mask, new=4, do_sample=False, cache=cache)
    assert torch.equal(got, _generate(model, reference, ids, mask, new=4, do_sample=False))


def test_latent_attention_models_keep_transformers_cache():
    """DeepSeek V3's latent K/V (kv_lora_rank: keys and values of other shapes) cannot go in pages: PagedCache
    refuses it, and generate() keeps transformers' cache, with sdpa's tokens."""
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=256, pad_token_id=0)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        PagedCache(config)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids, mask = left_padded_batch([6, 4])
    want = _generate(model, "sdpa", ids, mask, new=5, do_sample=False)
    assert torch.equal(_generate(model, "hf_flash", ids, mask, new=5, do_sample=False), want)


def test_beam_search_matches_sdpa(device):
    model, _ = tiny_model("mistral")
    model.to(device)
    lengths = [13, 6, 2]
    ids, mask = (t.to(device) for t in left_padded_batch(lengths))
    kwargs = {"new": 24, "num_beams": 4, "do_sample": False, "num_return_sequences": 2, "output_scores": True,
              "return_dict_in_generate": True}
    want = _generate(model, "sdpa", ids, mask, **kwargs)
    out = _generate(model, "hf_flash", ids, mask, **kwargs)
    assert type(cache_of(out)).__name__ == "PagedCache"
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(out.sequences_scores, want.sequences_scores, atol=1e-4, rtol=0)
    # Page size 4: beams share their pages and copy the partly filled one at almost every step.
    cache = PagedCache(model.config, page_size=4)
    got = _generate(model, "hf_flash", ids, mask, **kwargs, cache=cache)
    assert torch.equal(got.sequences, want.sequences)
    stored = [n + 24 - 1 for n in lengths for _ in range(4)]
    _check_memory(cache, model.config, stored, shared=True)
    assert cache.memory_stats()["pages_used"] < sum(math.ceil(n / 4) for n in stored)  # beams do share pages


def test_sampling_num_return_sequences_matches_sdpa(device):
    model, _ = tiny_model("qwen3")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([11, 4, 8]))
    seed = int(torch.randint(0, 2**31, ()))
    outs = {}
    for impl in ("sdpa", "hf_flash"):
        torch.manual_seed(seed)
        outs[impl] = _generate(model, impl, ids, mask, new=24, do_sample=True, num_return_sequences=3,
                               return_dict_in_generate=True)
    assert type(cache_of(outs["hf_flash"])).__name__ == "PagedCache"
    assert outs["hf_flash"].sequences.shape == (9, ids.shape[1] + 24)
    assert torch.equal(outs["hf_flash"].sequences, outs["sdpa"].sequences)
    # The three samples of a prompt differ (so the repeated sequences really are separate).
    assert len({tuple(s.tolist()) for s in outs["sdpa"].sequences[:3]}) > 1


@pytest.mark.parametrize("assistant_impl", ["sdpa", "hf_flash"])
def test_assisted_decoding_matches_greedy(assistant_impl, monkeypatch):
    model, _ = tiny_model("mistral")  # sliding window 8: crop must leave every needed key in place
    assistant, _ = tiny_model("llama")  # same vocabulary, other weights: most candidates are rejected
    assistant.set_attn_implementation(assistant_impl)
    ids = torch.randint(1, 128, (1, 9))
    mask = torch.ones_like(ids)
    want = _generate(model, "sdpa", ids, mask, do_sample=False)
    crops = []
    original_crop = PagedCache.crop
    monkeypatch.setattr(PagedCache, "crop", lambda self, n: (crops.append(n), original_crop(self, n))[1])
    out = _generate(model, "hf_flash", ids, mask, do_sample=False, assistant_model=assistant,
                    return_dict_in_generate=True)
    assert type(cache_of(out)).__name__ == "PagedCache"
    assert torch.equal(out.sequences, want)
    assert any(n < 0 for n in crops), f"no rejected candidates were cropped: {crops}"
    _check_memory(cache_of(out), model.config, [out.sequences.shape[1] - 1])


def test_generate_grows_a_small_pool():
    model, _ = tiny_model("llama")
    lengths = [10, 3]
    ids, mask = left_padded_batch(lengths)
    want = _generate(model, "sdpa", ids, mask, new=40, do_sample=False)
    cache = PagedCache(model.config, page_size=4, num_pages=2, grow=True)
    assert _generate(model, "hf_flash", ids, mask, new=40, do_sample=False, cache=cache).equal(want)
    stored = [n + 40 - 1 for n in lengths]
    assert cache.num_pages >= sum(math.ceil(n / 4) for n in stored) > 2
    _check_memory(cache, model.config, stored)
    # Without growth the same generate stops with an error that says what to do.
    small = PagedCache(model.config, page_size=4, num_pages=2, grow=False)
    with pytest.raises(PoolExhaustedError, match=r"2 pages of 4 tokens.*num_pages/max_memory or grow=True"):
        _generate(model, "hf_flash", ids, mask, new=40, do_sample=False, cache=small)


# -------------------------------------------------------------------------- model forward steps, exhaustion


def _positions(mask):
    """generate's position ids for a left-padded batch."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


class Steps:
    """Feeds chunks of tokens to a model with a cache, and checks each chunk's logits against one sdpa (or eager)
    forward over every token kept so far (no cache)."""

    def __init__(self, model, reference, ids, mask, cache):
        self.model, self.reference, self.cache = model, reference, cache
        self.ids, self.mask = ids, mask
        self.fed = 0  # columns of ids already in the cache

    def _run(self, ids, mask, start):
        self.model.set_attn_implementation("hf_flash")
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)[:, start:],
                              **{CACHE_NAME: self.cache}).logits

    def feed(self, chunk):
        """Feed ``chunk`` (``[B, n]`` ids, all valid, or ``None``: the prompt) and check its logits."""
        if chunk is not None:
            chunk = chunk.to(self.ids.device)
            self.ids = torch.cat([self.ids, chunk], 1)
            self.mask = torch.cat([self.mask, torch.ones_like(chunk)], 1)
        start = self.fed
        got = self._run(self.ids[:, start:], self.mask, start)
        self.fed = self.ids.shape[1]
        self.model.set_attn_implementation(self.reference)
        with torch.no_grad():
            want = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=_positions(self.mask)).logits
        valid = self.mask[:, start:].bool()
        torch.testing.assert_close(got[valid], want[:, start:][valid], atol=1e-4, rtol=0)

    def feed_unkept(self, chunk):
        """Feed ``chunk`` without keeping it in the reference sequence (it is expected to fail)."""
        mask = torch.cat([self.mask, torch.ones_like(chunk)], 1)
        return self._run(chunk, mask, self.fed)


@pytest.mark.parametrize("grow", [False, True])
def test_pool_exhaustion_keeps_stored_tokens(grow):
    model, reference = tiny_model("gemma2")  # sliding window 8 and soft-capping on top of the pages
    ids, mask = left_padded_batch([7, 3])
    cache = PagedCache(model.config, page_size=4, num_pages=6, grow=grow)
    steps = Steps(model, reference, ids, mask, cache)
    steps.feed(None)  # 7 and 3 tokens: 2 + 1 pages
    steps.feed(torch.randint(1, 128, (2, 1)))  # 8 and 4 tokens: both sequences end exactly on a page boundary
    before = cache.memory_stats()
    assert (before["pages_used"], before["tokens"], cache.page_table.lengths) == (3, 12, [8, 4])
    seen = cache.get_seq_length()

    chunk = torch.randint(1, 128, (2, 20))  # 28 and 24 tokens: 7 + 6 pages, 10 more than held, 3 free
    if grow:
        steps.feed(chunk)
        assert cache.num_pages >= 13 and cache.page_table.lengths == [28, 24]
        _check_memory(cache, model.config, [28, 24])
    else:
        with pytest.raises(PoolExhaustedError) as error:
            steps.feed_unkept(chunk)
        message = str(error.value)
        assert "6 pages of 4 tokens" in message and "3 in use, 3 free" in message, message
        assert "needs 10 more for 40 new tokens" in message, message
        # Nothing changed: same pages, tokens, lengths and positions.
        assert cache.memory_stats() == before and cache.get_seq_length() == seen and cache.page_table.lengths == [8, 4]
    # Steps that fit go on attending every token stored before (a 2-token step crosses a page boundary).
    steps.feed(torch.randint(1, 128, (2, 2)))
    steps.feed(torch.randint(1, 128, (2, 1)))
    _check_memory(cache, model.config, [31, 27] if grow else [11, 7])


def test_paged_steps_through_triton_kernels(device):
    """Padded prefill, decode across a page boundary, then repeated sequences writing into a shared, partly filled
    page (copy on write): with the Triton kernels (interpreter on CPU) for attention and page writes."""
    for name in ("decode", "prefill", "paged_kv"):
        pytest.importorskip(f"hf_flash.kernels.{name}")
    model, reference = tiny_model("qwen3")
    model.to(device)  # CPU tensors reach Triton only through its interpreter
    ids, mask = (t.to(device) for t in left_padded_batch([7, 2]))
    cache = PagedCache(model.config, page_size=4, num_pages=7, grow=False)
    with ops.use_backend("triton"):
        steps = Steps(model, reference, ids, mask, cache)
        steps.feed(None)
        steps.feed(torch.randint(1, 128, (2, 1)))  # 8 and 3 tokens
        steps.feed(torch.randint(1, 128, (2, 1)))  # 9 and 4: a third page for the first, the second's is full
        cache.batch_repeat_interleave(2)
        steps.ids, steps.mask = steps.ids.repeat_interleave(2, 0), steps.mask.repeat_interleave(2, 0)
        assert cache.memory_stats()["pages_used"] == 4  # shared, not copied
        steps.feed(torch.randint(1, 128, (4, 1)))  # different tokens per copy: 10 and 5 tokens
        steps.feed(torch.randint(1, 128, (4, 2)))  # 12 and 7
    assert cache.page_table.lengths == [12, 12, 7, 7]
    # Full pages stay shared; each copy has its own last page (a copy of the shared one, or a new one).
    pages = cache.page_table.pages
    assert pages[0][:2] == pages[1][:2] and pages[2][:1] == pages[3][:1]
    assert len({p[-1] for p in cache.page_table.pages}) == 4 and cache.memory_stats()["pages_free"] == 0


# --------------------------------------------------------------------------- bookkeeping, without a model

CONFIG = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
_ATTENTION = SimpleNamespace(is_causal=True)  # what paged_attention_forward reads of the attention module


class Shadow:
    """Drives a PagedCache through the paged attention path with random K/V/Q (as the model's layers would) and
    keeps its own copy of every sequence's keys and values, to check the pages and every step's attention."""

    def __init__(self, cache, batch):
        self.cache = cache
        empty = torch.empty(0, KV_HEADS, HEAD_DIM)
        self.kv = [[(empty, empty) for _ in range(batch)] for _ in range(cache.num_layers)]
        self.mask = torch.zeros(batch, 0, dtype=torch.long)  # every position's, as generate() carries it

    def step(self, q_len, valid=None):
        """``q_len`` new positions per sequence, of which the last ``valid[b]`` are tokens (left padding)."""
        batch = len(self.kv[0])
        valid = [q_len] * batch if valid is None else valid
        mask = torch.tensor([[0] * (q_len - n) + [1] * n for n in valid])
        self.mask = mask = torch.cat([self.mask[:, : self.cache.get_seq_length()], mask], 1)
        for layer, seqs in enumerate(self.kv):
            k, v = torch.randn(batch, KV_HEADS, q_len, HEAD_DIM), torch.randn(batch, KV_HEADS, q_len, HEAD_DIM)
            q = torch.randn(batch, HEADS, q_len, HEAD_DIM)
            key, _ = self.cache.update(k, v, layer)
            out = paged_attention_forward(_ATTENTION, q, key, mask)
            for b, n in enumerate(valid):
                if not n:
                    continue
                keys = torch.cat([seqs[b][0], k[b, :, q_len - n :].transpose(0, 1)])
                values = torch.cat([seqs[b][1], v[b, :, q_len - n :].transpose(0, 1)])
                seqs[b] = (keys, values)
                ref, _ = attention_ref(q[b, :, q_len - n :].transpose(0, 1), keys, values, causal=True)
                torch.testing.assert_close(out[b, q_len - n :], ref.float(), atol=1e-5, rtol=0)
        self.check()

    def select(self, rows):
        self.kv = [[seqs[r] for r in rows] for seqs in self.kv]
        self.mask = self.mask[rows]

    def keep(self, lengths):
        self.kv = [[(k[:n], v[:n]) for (k, v), n in zip(seqs, lengths)] for seqs in self.kv]

    def check(self):
        """The pages hold exactly the shadow's tokens; reference counts match the block table."""
        cache = self.cache
        assert cache.page_table.lengths == [k.shape[0] for k, _ in self.kv[0]]
        for layer, seqs in zip(cache.layers, self.kv):
            for pages, n, (keys, values) in zip(cache.page_table.pages, cache.page_table.lengths, seqs):
                assert len(pages) == math.ceil(n / cache.page_size)
                index = torch.tensor(pages, dtype=torch.long)
                assert torch.equal(layer.keys[index].flatten(0, 1)[:n], keys)
                assert torch.equal(layer.values[index].flatten(0, 1)[:n], values)
        counts = [0] * cache.num_pages
        for pages in cache.page_table.pages:
            for p in pages:
                counts[p] += 1
        assert cache.page_table.refs == counts
        assert sorted(cache.page_table.free) == [p for p, c in enumerate(counts) if c == 0]


def _cache(**kwargs):
    return PagedCache(CONFIG, **{"page_size": 4, "num_pages": 16, "grow": False, **kwargs})


def test_reorder_shares_pages_by_reference():
    cache = _cache()
    shadow = Shadow(cache, 3)
    shadow.step(10)  # 3 pages each, the last holding 2 tokens
    pools = [(layer.keys.data_ptr(), layer.keys.clone()) for layer in cache.layers]
    pages = [list(p) for p in cache.page_table.pages]
    cache.reorder_cache(torch.tensor([2, 0, 2]))
    shadow.select([2, 0, 2])
    shadow.check()
    assert cache.page_table.pages == [pages[2], pages[0], pages[2]]
    assert all(cache.page_table.refs[p] == 2 for p in pages[2]) and all(cache.page_table.refs[p] == 1 for p in pages[0])
    assert sorted(cache.page_table.free[-3:]) == sorted(pages[1])  # the dropped sequence's pages are free again
    assert cache.memory_stats()["pages_used"] == 6 and cache.memory_stats()["tokens"] == 30
    for layer, (pointer, keys) in zip(cache.layers, pools):  # no copy: the pools were not touched
        assert layer.keys.data_ptr() == pointer and torch.equal(layer.keys, keys)
    cache.reorder_cache(torch.tensor([1, 1, 1]))  # the last references to pages[2] go
    shadow.select([1, 1, 1])
    shadow.check()
    assert all(cache.page_table.refs[p] == 3 for p in pages[0]) and all(cache.page_table.refs[p] == 0 for p in pages[2])
    assert cache.memory_stats()["pages_used"] == 3


def test_copy_on_write_of_a_shared_partly_filled_page():
    cache = _cache()
    shadow = Shadow(cache, 2)
    shadow.step(6)  # 2 pages each: one full, one with 2 tokens
    cache.reorder_cache(torch.tensor([1, 1]))
    shadow.select([1, 1])
    shared = list(cache.page_table.pages[0])
    shadow.step(1)  # both write into the shared half-filled page: one copies it, the other keeps it
    pages = cache.page_table.pages
    assert pages[0][0] == pages[1][0] == shared[0] and cache.page_table.refs[shared[0]] == 2
    assert pages[0][1] != pages[1][1] and shared[1] in (pages[0][1], pages[1][1])
    assert cache.memory_stats()["pages_used"] == 3
    # Three sharers of a page holding 3 tokens write 3 tokens each (crossing into a new page): two copies, the last
    # writer keeps the original.
    cache.batch_select_indices([0])
    shadow.select([0])
    cache.batch_repeat_interleave(3)
    shadow.select([0, 0, 0])
    shadow.step(3)  # 7 -> 10 tokens: the shared page 2 gets 1 token, a new page 3 gets 2
    assert len({p[1] for p in cache.page_table.pages}) == 3 and len({p[2] for p in cache.page_table.pages}) == 3
    assert cache.memory_stats()["pages_used"] == 1 + 3 + 3


def test_copy_on_write_fits_a_pool_with_exactly_the_pages_needed():
    """Two sharers writing into their shared partly filled page need one new page, not two."""
    cache = _cache(num_pages=2)
    shadow = Shadow(cache, 1)
    shadow.step(2)
    cache.batch_repeat_interleave(2)
    shadow.select([0, 0])
    shadow.step(1)
    assert cache.memory_stats()["pages_free"] == 0


def test_update_takes_the_layer_index_as_dynamic_cache_does():
    """An int of numpy's or a 0-d tensor names a layer as an int does; past the layers, or a bool, is refused."""
    import numpy as np

    cache = _cache()
    k = torch.randn(1, KV_HEADS, 3, HEAD_DIM)
    for index in (np.int64(1), torch.tensor(1)):
        view, _ = cache.update(k, k, index)
        assert view.layer_idx == 1 and type(view.layer_idx) is int
    for bad in (2, -1, True, 1.0):
        with pytest.raises(ValueError, match="layer_idx .* is out of range"):
            cache.update(k, k, bad)


def test_batch_repeat_interleave_and_select_indices():
    cache = _cache(num_pages=32)
    shadow = Shadow(cache, 2)
    shadow.step(5, valid=[5, 3])
    used = cache.memory_stats()["pages_used"]
    cache.batch_repeat_interleave(torch.tensor(3))  # a 0-d tensor (or numpy's int) as DynamicCache takes it
    shadow.select([0, 0, 0, 1, 1, 1])
    shadow.check()
    assert cache.batch_size == 6 and cache.memory_stats()["pages_used"] == used
    assert cache.get_seq_length() == 5
    shadow.step(2)
    cache.batch_select_indices(torch.tensor([4, 0]))
    shadow.select([4, 0])
    shadow.check()
    assert cache.batch_size == 2
    shadow.step(3)
    with pytest.raises(ValueError, match="holds 2 sequences but the step has 3"):
        Shadow(cache, 3).step(1)


def test_crop():
    cache = _cache()
    shadow = Shadow(cache, 2)
    shadow.step(7, valid=[7, 2])  # 5 padding positions in the second sequence (not stored)
    shadow.step(3)
    assert cache.get_seq_length() == 10 and cache.page_table.lengths == [10, 5]
    cache.crop(-3)  # newest 3 positions of every sequence
    shadow.keep([7, 2])
    shadow.check()
    assert cache.get_seq_length() == 7 and cache.memory_stats()["pages_used"] == 2 + 1
    cache.crop(0)  # transformers 5.17 / 5.23: removes nothing
    cache.crop(9)  # keep the first 9 positions: more than there are, nothing happens
    shadow.check()
    cache.crop(6)  # keep the first 6 positions: 6 and 1 tokens
    shadow.keep([6, 1])
    shadow.check()
    assert cache.get_seq_length() == 6
    shadow.step(3)  # writes go after the kept tokens, into the kept partly filled pages
    cache.reorder_cache(torch.tensor([0, 0]))
    shadow.select([0, 0])
    cache.crop(4)  # 9 tokens each -> 4: the shared pages beyond the first lose both references at once
    shadow.keep([4, 4])
    shadow.check()
    assert cache.memory_stats()["pages_used"] == 1
    shadow.step(1)  # the shared page is full: no copy needed, a new page each
    assert cache.memory_stats()["pages_used"] == 3


def test_a_step_begun_by_a_caller_is_ended_by_it():
    """DecodeGraphs begins a decode step ahead of the forward and replays it: the layers never see that plan. Once the
    caller commits, the next forward (a chat's next prefill, say) plans its own step instead of taking the spent one;
    a step the caller aborts leaves the cache as it was."""
    cache = _cache()
    Shadow(cache, 2).step(5)
    before = cache.snapshot()
    cache.begin_step(None, 1, 2)
    assert cache.get_seq_length() == 5  # reads see the last committed step
    cache.abort_step()
    assert cache.snapshot() == before
    cache.begin_step(None, 1, 2)
    cache.commit_step()
    assert cache.get_seq_length() == 6
    plan = cache.layer_plan(0, None, 3, 2)
    assert plan.q_len == 3 and plan.slots.numel() == 6 and cache.page_table.lengths == [9, 9]


def test_reset_forgets_everything_and_is_reusable():
    cache = _cache()
    Shadow(cache, 3).step(9)
    pools = [layer.keys for layer in cache.layers]
    cache.reset()
    stats = cache.memory_stats()
    assert (stats["pages_used"], stats["tokens"], cache.get_seq_length(), cache.batch_size) == (0, 0, 0, 0)
    assert all(layer.keys is pool and not pool.any() for layer, pool in zip(cache.layers, pools))
    shadow = Shadow(cache, 2)  # another batch size
    shadow.step(5, valid=[5, 1])
    shadow.step(1)


def test_take_pools_of_a_gone_cache_all_or_none():
    """A new cache takes over a gone cache's pools at its first step, zeroed, every layer's (and checks its steps with
    them as with new ones); pools of another size are let go for new ones; a cache that ran a step refuses."""
    donor = _cache()
    Shadow(donor, 3).step(9)
    layers, pools = donor.layers, [(layer.keys, layer.values) for layer in donor.layers]
    del donor
    cache = _cache()
    cache.take_pools(layers)
    shadow = Shadow(cache, 2)
    shadow.step(1)  # zeroed: only what this step stored is non-zero
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(cache.layers, pools))
    assert all(int((layer.keys != 0).any(-1).any(-1).sum()) == 2 for layer in cache.layers)
    shadow.step(6)
    with pytest.raises(ValueError, match="has not run a step"):
        cache.take_pools(layers)
    other = _cache(num_pages=8)  # another pool size: new pools
    other.take_pools(cache.layers)
    Shadow(other, 1).step(3)
    assert all(layer.keys is not k and layer.keys.shape[0] == 8 for layer, (k, _) in zip(other.layers, pools))


def test_max_batch_size_and_max_memory():
    with pytest.raises(ValueError, match="exceeds max_batch_size=2"):
        Shadow(_cache(max_batch_size=2), 3).step(1)
    Shadow(_cache(max_batch_size=3), 3).step(1)
    per_page = 2 * CONFIG.num_hidden_layers * 4 * KV_HEADS * HEAD_DIM * 4  # K + V, all layers, fp32
    cache = PagedCache(CONFIG, page_size=4, max_memory=5 * per_page + per_page // 2)
    Shadow(cache, 1).step(3)
    assert cache.num_pages == 5 and cache.memory_stats()["bytes_allocated"] == 5 * per_page
    with pytest.raises(PoolExhaustedError, match="5 pages of 4 tokens"):
        Shadow(cache, 1).step(20)


def test_a_refused_first_step_leaves_the_cache_empty():
    cache = _cache(num_pages=2)
    with pytest.raises(PoolExhaustedError, match="2 pages of 4 tokens.*needs 9 more for 30 new tokens"):
        Shadow(cache, 3).step(10)
    assert cache.batch_size == 0 and cache.memory_stats()["pages_used"] == 0
    mask = torch.ones(3, 3, dtype=torch.long)  # three rows for a batch of two
    key = torch.randn(2, KV_HEADS, 3, HEAD_DIM)
    kv, _ = cache.update(key, key, 0)
    with pytest.raises(ValueError, match=r"2-D \[batch, length\] padding mask"):
        paged_attention_forward(_ATTENTION, torch.randn(2, HEADS, 3, HEAD_DIM), kv, mask)
    assert cache.batch_size == 0
    Shadow(cache, 1).step(8)  # another batch size, that fits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_paged_cache_with_another_attention_raises(impl):
    model, _ = tiny_model("llama")
    ids, mask = left_padded_batch([5, 3])
    with pytest.raises(TypeError, match="attn_implementation='hf_flash'"):
        _generate(model, impl, ids, mask, new=2, cache=PagedCache(model.config))


def test_generate_patch_reverts():
    model, _ = tiny_model("llama")
    ids, mask = left_padded_batch([6, 4])
    kwargs = {"new": 5, "do_sample": False, "return_dict_in_generate": True}
    paged = _generate(model, "hf_flash", ids, mask, **kwargs)
    assert type(cache_of(paged)).__name__ == "PagedCache"
    try:
        generate_patch.revert()
        dynamic = _generate(model, "hf_flash", ids, mask, **kwargs)
        assert type(cache_of(dynamic)) is transformers.DynamicCache
        assert torch.equal(dynamic.sequences, paged.sequences)
    finally:
        generate_patch.apply()
    again = _generate(model, "hf_flash", ids, mask, **kwargs)
    assert type(cache_of(again)).__name__ == "PagedCache"
    # Other implementations never get one.
    assert type(cache_of(_generate(model, "sdpa", ids, mask, **kwargs))) is transformers.DynamicCache


def test_padding_inside_prompts_matches_reference():
    """generate() masks every pad token, not only leading ones (a prompt may contain the pad id): the pages keep
    the valid tokens only, in order, and attention over them equals sdpa's masked attention."""
    model, reference = tiny_model("llama")
    ids, mask = left_padded_batch([12, 9])
    mask[0, 5:7] = 0  # two pad tokens inside the first prompt
    ids[0, 5:7] = 0
    outs = {impl: _generate(model, impl, ids, mask, new=16, do_sample=False, return_dict_in_generate=True)
            for impl in (reference, "hf_flash")}
    assert torch.equal(outs["hf_flash"].sequences, outs[reference].sequences)
    assert cache_of(outs["hf_flash"]).page_table.lengths == [10 + 15, 9 + 15]


def test_crop_through_padding_inside_a_prompt_matches_dynamic_cache():
    """Cropping positions that held padding (never stored) takes away only the tokens of the cropped positions: the
    next step's logits equal those of a DynamicCache cropped alike."""
    model, reference = tiny_model("llama")
    ids, mask = torch.randint(1, 128, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[0, 4:6] = 0  # two pad tokens inside the first prompt, among the positions cropped below
    ids[0, 4:6] = 0
    step_ids, step_mask = torch.randint(1, 128, (2, 1)), torch.cat([mask[:, :4], torch.ones(2, 1, dtype=torch.long)], 1)
    logits = {}
    for impl, cache in ((reference, transformers.DynamicCache(config=model.config)),
                        ("hf_flash", PagedCache(model.config, page_size=4))):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **{CACHE_NAME: cache})
            cache.crop(-4)  # positions 4..7: two tokens of the first sequence, four of the second
            logits[impl] = model(input_ids=step_ids, attention_mask=step_mask, position_ids=torch.full((2, 1), 4),
                                 **{CACHE_NAME: cache}).logits
    assert cache.page_table.lengths == [4 + 1, 4 + 1]
    torch.testing.assert_close(logits["hf_flash"], logits[reference], atol=1e-4, rtol=0)

"""Model-level equivalence: tiny random models of each supported family, hf_flash against transformers' own
attention (sdpa; eager for Gemma2, whose soft-cap sdpa does not implement), fp32 on CPU."""
import inspect
import logging

import pytest
import torch
import transformers

import hf_flash  # noqa: F401  (registers "hf_flash")
from hf_flash import PagedCache, ops, patches
from hf_flash.patches import attn_implementation as attn_implementation_patch
from hf_flash.internals import CACHE_NAME

_COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0}

# family -> (config class, extra config, reference implementation)
FAMILIES = {
    "llama": ("LlamaConfig", {}, "sdpa"),
    # SmolLM2 is a Llama with GQA 3:1 and head dim 64.
    "smollm2": ("LlamaConfig", {"hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1}, "sdpa"),
    "mistral": ("MistralConfig", {"sliding_window": 8}, "sdpa"),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                                  "layer_types": ["full_attention", "sliding_attention"]}, "sdpa"),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, "sdpa"),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 5.0,
                                    "final_logit_softcapping": None, "query_pre_attn_scalar": 16}, "eager"),
    "phi3": ("Phi3Config", {"pad_token_id": 0}, "sdpa"),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]}, "sdpa"),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32}, "sdpa"),
}


pytestmark = pytest.mark.usefixtures("torch_path_on_cpu")


def tiny_model(family):
    cls, extra, reference = FAMILIES[family]
    config = getattr(transformers, cls)(**{**_COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=reference).eval()
    return model, reference


def left_padded_batch(lengths, vocab=128):
    """Prompts of different lengths, left-padded as ``generate`` expects for decoder-only models."""
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
        ids[row, : width - n] = 0
    return ids, mask


def _logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_reference(family):
    model, reference = tiny_model(family)
    ids, mask = left_padded_batch([19, 12, 5])
    want = _logits(model, reference, ids, mask)
    got = _logits(model, "hf_flash", ids, mask)
    assert torch.isfinite(got).all()
    valid = mask.bool()
    # fp32 end to end: the only differences are summation order (~1e-6 on these logits).
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache", ["default", "dynamic"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_matches_reference(family, cache, device):
    """``default``: generate() gives hf_flash a PagedCache; ``dynamic``: the caller's DynamicCache, which generate()
    fills (through transformers' flash path: unpadding to the varlen kernel) as it does with sdpa. On the GPU device
    when there is one."""
    model, reference = tiny_model(family)
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([17, 9, 4]))
    outs = {}
    for impl in (reference, "hf_flash"):
        model.set_attn_implementation(impl)
        extra = {CACHE_NAME: transformers.DynamicCache(config=model.config)} if cache == "dynamic" else {}
        outs[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                                    min_new_tokens=32, pad_token_id=0, return_dict_in_generate=True, **extra)
        if extra:
            assert getattr(outs[impl], CACHE_NAME) is extra[CACHE_NAME]
            assert extra[CACHE_NAME].get_seq_length() == ids.shape[1] + 31  # the last new token is never fed back
    assert outs["hf_flash"].sequences.shape == (3, ids.shape[1] + 32)
    assert torch.equal(outs["hf_flash"].sequences, outs[reference].sequences)


def test_from_pretrained_with_hf_flash(tmp_path):
    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hf_flash")
    assert loaded.config._attn_implementation == "hf_flash"
    ids, mask = left_padded_batch([7, 3])
    torch.testing.assert_close(_logits(loaded, "hf_flash", ids, mask)[mask.bool()],
                               _logits(model, "sdpa", ids, mask)[mask.bool()], atol=1e-4, rtol=0)


def test_packed_sequences_match_separate_runs():
    """Packed (padding-free) batches reach the varlen kernel through cu_seq_lens and position_ids."""
    model, _ = tiny_model("mistral")
    model.set_attn_implementation("hf_flash")
    a, b = torch.randint(1, 128, (1, 11)), torch.randint(1, 128, (1, 6))
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(11), torch.arange(6)])[None]
    with torch.no_grad():
        got = model(input_ids=packed, position_ids=position_ids).logits
        want = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache", [None, "dynamic", "paged"])
def test_arbitrary_4d_mask_is_refused(cache):
    """A caller's own 4-D mask reaches the attention untouched; hf_flash cannot follow an arbitrary pattern, so it
    says so (not an IndexError deep in unpadding), and a PagedCache stores nothing of the refused forward."""
    model, _ = tiny_model("llama")
    model.set_attn_implementation("hf_flash")
    ids = torch.randint(1, 128, (2, 7))
    pattern = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7)
    caches = {None: None, "dynamic": transformers.DynamicCache(config=model.config), "paged": PagedCache(model.config)}
    given = {} if cache is None else {CACHE_NAME: caches[cache]}
    with torch.no_grad(), pytest.raises(ValueError, match=r"2-D \[batch, length\] padding mask.*\(2, 1, 7, 7\)"):
        model(input_ids=ids, attention_mask=pattern, **given)
    if cache == "paged":  # (a DynamicCache keeps what transformers' layers stored before the attention raised)
        assert caches[cache].get_seq_length() == 0 and caches[cache].memory_stats()["tokens"] == 0
        with torch.no_grad():  # the same forward with the 2-D mask it stands for goes through
            assert torch.isfinite(model(input_ids=ids, attention_mask=torch.ones(2, 7), **given).logits).all()


_GEMMA4 = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, sliding_window=8,
               layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=128,
               hidden_size_per_layer_input=8, max_position_embeddings=256, pad_token_id=0)


@pytest.mark.parametrize(("extra", "reason"), [
    ({"global_head_dim": 32}, "head_dim vary from layer to layer"),  # as every Gemma 4 config has
    ({"global_head_dim": 16, "num_kv_shared_layers": 2}, "num_kv_shared_layers"),  # Gemma 3n / 4's small models
])
def test_models_a_paged_cache_cannot_hold_keep_transformers_cache(extra, reason, caplog):
    """Layers of other shapes, or layers attending with an earlier layer's K/V (which over a PagedCache re-planned the
    step and committed nothing: the prompt was forgotten at the next step), are refused by PagedCache; generate() keeps
    transformers' cache for such models, says why, and gives sdpa's tokens."""
    config = transformers.Gemma4TextConfig(**_GEMMA4, **extra)
    with pytest.raises(ValueError, match=reason):
        PagedCache(config)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(1, 128, (2, 12))
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "return_dict_in_generate": True}
    want = model.generate(input_ids=ids, **options).sequences
    model.set_attn_implementation("hf_flash")
    with caplog.at_level(logging.WARNING, logger="hf_flash"):
        got = model.generate(input_ids=ids, **options)
    assert torch.equal(got.sequences, want)
    assert not isinstance(getattr(got, CACHE_NAME), PagedCache)
    assert any("keeps transformers' cache for Gemma4ForCausalLM" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records)


def test_image_tokens_attending_both_ways_are_refused():
    """Gemma 3's image tokens attend each other both ways: a mask transformers' flash mask function would drop (5.17
    loads the model for flash attention; 5.25 lets its text model take hf_flash by a dict). Refused, naming sdpa;
    the same model on text alone runs, with sdpa's logits."""
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    ids = torch.randint(1, 290, (1, 16))
    ids[0, 3], ids[0, 4:8], ids[0, 8] = 297, 299, 298
    image = {"pixel_values": torch.randn(1, 3, 28, 28), "token_type_ids": (ids == 299).long()}
    with torch.no_grad():
        want = model(input_ids=ids).logits
        model.set_attn_implementation({"text_config": "hf_flash", "vision_config": "sdpa"})
        with pytest.raises(ValueError, match="attention mask is not causal.*attn_implementation='sdpa'"):
            model(input_ids=ids, **image)
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-4, rtol=0)


def test_a_bidirectional_gemma3_encoder_matches_sdpa():
    """EmbeddingGemma's encoder (use_bidirectional_attention) ORs a both-ways span onto the causal mask too, but its
    attention is bidirectional, with a two-sided window on sliding layers: the flash path attends so, with sdpa's
    states, where a causal model's OR-ed spans are refused."""
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention=True, pad_token_id=0)
    model = transformers.Gemma3TextModel(config).eval()
    ids, mask = torch.randint(1, 128, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    states = {}
    for impl in ("sdpa", "hf_flash"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            states[impl] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(states["hf_flash"][mask.bool()], states["sdpa"][mask.bool()], atol=1e-4, rtol=0)


def test_an_fp32_model_without_linear_attention_layers_says_why():
    """transformers' flash path picks the dtype of fp32 inputs from an nn.Linear of the attention module; GPT-2's
    Conv1D has none and its StopIteration, escaping the forward, would silently end a caller's loop over batches.
    A RuntimeError says what to do; in fp16 the model runs."""
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="hf_flash").eval()
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="nn.Linear.*fp16 or bf16"):
            list(map(lambda batch: model(batch[None]).logits, ids))
        model.half()
        assert torch.isfinite(model(ids).logits).all()


def test_generate_through_triton_kernels(device):
    """The same generate, with every attention call forced through the Triton kernels (interpreter on CPU)."""
    model, _ = tiny_model("qwen2")
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([10, 6]))
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("hf_flash")
    with ops.use_backend("triton"):
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_continuous_batching_matches_reference(family, device):
    """generate_batch (transformers' continuous batching, its own paged cache): requests of different lengths share
    steps; it reaches our varlen function as "hf_flash" (5.23) or "paged|hf_flash" (5.17). Tokens must equal the
    reference's run of the same requests. On a GPU it captures its steps as CUDA graphs."""
    model, reference = tiny_model(family)
    model.to(device)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (11, 4, 7)]
    config = transformers.GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # A small cache (by default it is sized from the free memory: GBs on a CPU), and steps of at most 8 tokens: the
    # 11-token prompt is prefilled in chunks that read the earlier chunks back from the cache.
    batching = transformers.ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=8)
    outs = {}
    for impl in (reference, "hf_flash"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching,
                                           progress_bar=False)
        outs[impl] = {request: result.generated_tokens for request, result in results.items()}
    assert len(outs["hf_flash"]) == len(prompts)
    assert all(len(tokens) == 10 for tokens in outs["hf_flash"].values())
    assert outs["hf_flash"] == outs[reference]


def test_training_mode_is_refused():
    model, _ = tiny_model("llama")
    model.set_attn_implementation("hf_flash")
    model.train()
    with pytest.raises(NotImplementedError, match="inference-only"):
        model(input_ids=torch.randint(1, 128, (1, 5)))


def test_a_backward_pass_through_hf_flash_fails_loudly():
    """In eval mode with autograd recording (attributions, a frozen model's input gradients), the logits still lead
    back through the attention, to a node that raises: gradients never silently stop there. Both paths: no cache
    (transformers' flash path) and a PagedCache."""
    model, _ = tiny_model("llama")
    model.set_attn_implementation("hf_flash")
    ids = torch.randint(1, 128, (2, 5))
    for cache in ({}, {CACHE_NAME: PagedCache(model.config, page_size=4)}):
        logits = model(input_ids=ids, **cache).logits
        assert logits.requires_grad
        with pytest.raises(NotImplementedError, match="no backward pass"):
            logits.sum().backward()


def test_attention_dropout_is_refused_on_every_path():
    """A model in training mode under torch.no_grad asks for attention dropout, which hf_flash does not do: refused
    with and without a PagedCache, never silently skipped."""
    model, _ = tiny_model("llama")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.set_attn_implementation("hf_flash")
    model.train()
    for cache in ({}, {CACHE_NAME: PagedCache(model.config, page_size=4)}):
        with torch.no_grad(), pytest.raises(ValueError, match="no attention dropout"):
            model(input_ids=torch.randint(1, 128, (1, 5)), **cache)


def test_packed_rows_are_refused_on_a_paged_cache():
    """Documents packed back to back in one row (positions that restart) are attended apart without a cache, as
    transformers' flash path does; a PagedCache holds one sequence a row, so there they are refused, not mixed."""
    model, _ = tiny_model("llama")
    model.set_attn_implementation("hf_flash")
    ids = torch.randint(1, 128, (1, 11))
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits
        apart = torch.cat([model(input_ids=ids[:, :6]).logits, model(input_ids=ids[:, 6:]).logits], 1)
        torch.testing.assert_close(packed, apart, atol=1e-5, rtol=0)
        cache = PagedCache(model.config, page_size=4)
        with pytest.raises(NotImplementedError, match="packs several"):
            model(input_ids=ids, position_ids=positions, **{CACHE_NAME: cache})
        assert cache.get_seq_length() == 0
        model(input_ids=ids, position_ids=torch.arange(11)[None], **{CACHE_NAME: cache})  # one sequence: fine
    assert cache.get_seq_length() == 11


def test_models_transformers_runs_without_flash_attention_are_refused():
    """A model whose class says it does not support flash attention (Gemma 3's multimodal model: its image tokens
    attend both ways) has masks hf_flash's kernels cannot apply: asked for "hf_flash", it is refused with what to use,
    where transformers checks only the flash_attention_* names and would load it, attending causally."""
    class NoFlash(transformers.LlamaForCausalLM):
        _supports_flash_attn = False

    config = tiny_model("llama")[0].config
    with pytest.raises(ValueError, match=r"NoFlash does not run with flash attention.*attn_implementation='sdpa'"):
        NoFlash._from_config(config, attn_implementation="hf_flash")
    model = NoFlash._from_config(config, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="NoFlash does not run with flash attention"):
        model.set_attn_implementation("hf_flash")
    assert model.config._attn_implementation == "sdpa"


def test_attention_sinks_are_refused():
    """GPT-OSS passes sinks (s_aux); hf_flash has none yet and must say so rather than drop them silently."""
    from hf_flash.integration import hf_flash_attention_forward

    model, _ = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="s_aux"):
        hf_flash_attention_forward(attention, q, kv, kv, None, s_aux=torch.zeros(4))


def test_flash_attn_functions_take_flash_attns_arguments_in_its_order():
    """flash-attn 2's parameters, in its order (callers pass them by position): an ALiBi given as the ninth argument
    must be refused, not land in ``deterministic``; ``return_attn_probs`` gives its three values."""
    from hf_flash.integration import flash_attn_func, flash_attn_varlen_func

    common = ["dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
              "return_attn_probs"]  # flash_attn_interface.py, flash-attn 2.6 to 2.8
    assert list(inspect.signature(flash_attn_func).parameters) == ["q", "k", "v", *common]
    assert list(inspect.signature(flash_attn_varlen_func).parameters) == [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", *common, "block_table"]
    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, torch.ones(4))
    out, lse, dropout_mask = flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False, True)
    want, want_lse = ops.attention(q, k, v, causal=True, return_softmax_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse) and dropout_mask is None
    assert torch.equal(flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, True), want)
    # K/V in pages of 5, the sequences' pages swapped in the pool: through block_table, the packed call's attention.
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    packed = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 5, 5, causal=True)
    paged = flash_attn_varlen_func(q.flatten(0, 1), k.flip(0), v.flip(0), cu, cu, 5, 5, causal=True,
                                   block_table=torch.tensor([[1], [0]], dtype=torch.int32))
    torch.testing.assert_close(paged, packed, atol=1e-6, rtol=0)
    torch.testing.assert_close(packed, want.flatten(0, 1), atol=1e-6, rtol=0)


def test_a_block_table_from_continuous_batching_is_refused():
    """transformers' decode fast path passes a block table and leaves the read/write indices unset; the attention of
    "paged|hf_flash" reads through those indices, so it must refuse a block table before touching the cache."""
    from hf_flash.integration import continuous_batching_attention_forward

    class UntouchableCache:
        def update(self, **kwargs):
            raise AssertionError("the cache was written before the block table was refused")

    model, _ = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="max_blocks_per_request=0"):
        continuous_batching_attention_forward(attention, q, kv, kv, None, cache=UntouchableCache(), cu_seq_lens_q=cu,
                                              cu_seq_lens_k=cu, max_seqlen_q=3, max_seqlen_k=3, read_index=[],
                                              write_index=[], block_table=torch.zeros(1, 1, 1, dtype=torch.int32))


def test_continuous_batching_attention_takes_the_scaling_it_is_given():
    """"paged|hf_flash" attends with the ``scaling`` transformers passes (a model may scale otherwise than its
    module's attribute says), and refuses dropout as the other paths do."""
    from hf_flash.integration import continuous_batching_attention_forward

    class PackedCache:  # what transformers' paged cache returns: every key of the batch's sequences, packed
        def update(self, key_states, value_states, **kwargs):
            return key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)

    model, _ = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    args = dict(cache=PackedCache(), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_seqlen_q=5, max_seqlen_k=5,
                read_index=[], write_index=[])
    scaling = 0.7  # not the module's 16 ** -0.5
    got, _ = continuous_batching_attention_forward(attention, q, k, v, None, scaling=scaling, **args)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                                            v.double().repeat_interleave(2, 1), is_causal=True,
                                                            scale=scaling)
    torch.testing.assert_close(got.double(), want.transpose(1, 2), atol=1e-5, rtol=0)  # fp32 kernel vs fp64
    with pytest.raises(ValueError, match="dropout"):
        continuous_batching_attention_forward(attention, q, k, v, None, scaling=scaling, dropout=0.1, **args)


def test_models_listing_their_flash_kernels_are_refused():
    """GPT-OSS lists the flash kernels it works with, and transformers would swap the first of them in for "hf_flash"
    without a word; hf_flash refuses such a model instead, naming what to use. Other models load as before."""
    config = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=8)
    with pytest.raises(ValueError, match=r"GptOssForCausalLM works only with the flash kernels it lists \(.*"
                                         r"attention sinks.*attn_implementation='eager'"):  # no sdpa for GPT-OSS
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="hf_flash")
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with pytest.raises(ValueError, match="GptOssForCausalLM works only with"):
        model.set_attn_implementation("hf_flash")
    assert model.config._attn_implementation == "eager"
    assert tiny_model("llama")[0].set_attn_implementation("hf_flash") is None

    attn_implementation_patch.revert()  # undoable, like every patch
    try:
        assert transformers.PreTrainedModel._check_and_adjust_attn_implementation is \
            attn_implementation_patch._original_check
    finally:
        attn_implementation_patch.apply()


def test_other_flash_names_still_reach_transformers():
    """Our hook answers for "hf_flash" only: other names get transformers' own loader (and its own errors)."""
    import importlib.util

    import transformers.modeling_flash_attention_utils as flash_utils

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here: transformers would load it")
    assert flash_utils._lazy_imports("hf_flash")[0].__module__ == "hf_flash.integration"
    patches.flash_loader.revert()
    try:
        with pytest.raises(Exception, match="flash"):  # reverted: transformers' own loader, which knows no hf_flash
            flash_utils._lazy_imports("hf_flash")
    finally:
        patches.flash_loader.apply()
    assert flash_utils._lazy_imports("hf_flash")[0].__module__ == "hf_flash.integration"
    with pytest.raises(Exception) as caught:
        flash_utils._lazy_imports("flash_attention_2")
    assert "hf_flash" not in str(caught.value)

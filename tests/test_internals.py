"""The transformers internals hf_flash relies on (``hf_flash.internals``): a patch whose internal is missing or
changed is not applied and the log says once what is off; and the log carries no line about flash-attn that is
wrong for hf_flash."""
import logging

import pytest
import torch
import transformers
import transformers.modeling_flash_attention_utils as flash_utils
from test_cache import _generate, cache_of
from test_models import left_padded_batch, tiny_model
from transformers.generation.utils import GenerationMixin
from transformers.utils import logging as transformers_logging

from hf_flash.patches import generate as generate_patch
from hf_flash import internals

pytestmark = pytest.mark.usefixtures("torch_path_on_cpu")


@pytest.fixture
def fresh_warnings():
    """warning_once remembers every message it has emitted in this process; forget them for this test."""
    transformers_logging.warning_once.cache_clear()
    yield
    transformers_logging.warning_once.cache_clear()


def test_a_changed_internal_is_left_alone_and_named_once(caplog, fresh_warnings, monkeypatch):
    def renamed(self, config, kwargs, mode, batch, length):  # as if a release renamed the parameters
        raise AssertionError("never called: the generate() below runs transformers' own method")

    monkeypatch.setattr(GenerationMixin, "_prepare_cache_for_generation", renamed)
    with caplog.at_level(logging.WARNING, logger="hf_flash"):
        generate_patch.apply()
        generate_patch.apply()
    assert GenerationMixin._prepare_cache_for_generation is renamed
    lines = [r.getMessage() for r in caplog.records if "_prepare_cache_for_generation" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "no longer takes generation_config, model_kwargs, batch_size, max_cache_length" in lines[0]
    assert "no PagedCache, CUDA graphs or chunked prefill" in lines[0]
    assert GenerationMixin._prefill is generate_patch._prefill  # the others were applied
    monkeypatch.undo()
    generate_patch.apply()
    assert GenerationMixin._prepare_cache_for_generation is generate_patch._prepare_cache_for_generation


def test_the_decode_loop_needs_what_it_calls(caplog, fresh_warnings, monkeypatch):
    """hf_flash's decode loop replaces _sample and calls _prefill and _optimize_model_for_decode: without the latter
    (as if a release dropped it) _sample is left alone, and the log says once what is off."""
    monkeypatch.setattr(GenerationMixin, "_sample", generate_patch._original_sample)
    monkeypatch.delattr(GenerationMixin, "_optimize_model_for_decode")
    with caplog.at_level(logging.WARNING, logger="hf_flash"):
        generate_patch.apply()
    assert GenerationMixin._sample is generate_patch._original_sample
    lines = [r.getMessage() for r in caplog.records if "_optimize_model_for_decode is missing" in r.getMessage()]
    assert len(lines) == 1 and "run transformers' loop" in lines[0], lines
    monkeypatch.undo()
    generate_patch.apply()
    assert GenerationMixin._sample is generate_patch._sample


def test_the_default_generate_runs_on_a_paged_cache():
    """On every transformers release CI runs (5.17 and the newest): a PagedCache, not silently a DynamicCache."""
    model, _ = tiny_model("llama")
    ids, mask = left_padded_batch([6, 3])
    out = _generate(model, "hf_flash", ids, mask, new=3, do_sample=False, return_dict_in_generate=True)
    assert type(cache_of(out)).__name__ == "PagedCache"
    assert cache_of(out).page_table.lengths == [6 + 2, 3 + 2]
    assert internals.CACHE_NAME == ("cache" if transformers.__version__ >= "5.24" else "past_key_values")


def test_no_flash_attn_casting_line_for_an_fp32_model(fresh_warnings):
    """fp32 through transformers' flash path (a forward without a cache): transformers would log that fp32 inputs are
    cast "back to torch.float32 for flash-attn compatibility", a cast that does nothing; hf_flash computes fp32
    natively."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    flash_logger = logging.getLogger(flash_utils.__name__)
    flash_logger.addHandler(handler)
    try:
        model, _ = tiny_model("llama")
        ids, mask = left_padded_batch([6, 3])
        model.set_attn_implementation("hf_flash")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        flash_logger.warning_once("Casting fp32 inputs back to torch.bfloat16 for flash-attn compatibility.")
    finally:
        flash_logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert not any("back to torch.float32" in m for m in messages), messages
    assert any("back to torch.bfloat16" in m for m in messages)  # a real cast is still said
    assert model.dtype == torch.float32


def test_continuous_batching_on_a_gpu_leaves_async_double_buffering_off(caplog, fresh_warnings, monkeypatch):
    """``generate_batch`` with hf_flash on a GPU gets ``use_async_batching=False`` unless the caller set it (that mode
    returned wrong tokens with any mask-free attention on transformers 5.17: ``patches/continuous_batching.py``); the
    caller's config is never modified, and other implementations and devices get exactly what they passed."""
    from types import SimpleNamespace

    from transformers.generation import ContinuousMixin

    from hf_flash.patches import continuous_batching as patch

    assert ContinuousMixin.init_continuous_batching is patch.init_continuous_batching
    passed = []
    monkeypatch.setattr(patch, "_original_init", lambda model, generation, batching, *a, **k: passed.append(batching))

    def model(implementation="hf_flash", device="cuda", generation_config=None):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation), device=torch.device(device),
                               generation_config=generation_config or transformers.GenerationConfig())

    given = transformers.ContinuousBatchingConfig(num_blocks=16)
    with caplog.at_level(logging.WARNING, logger="hf_flash"):
        patch.init_continuous_batching(model(), None, given)
        patch.init_continuous_batching(model("paged|hf_flash"), None, None)
    assert passed[0].use_async_batching is False and passed[0].num_blocks == 16
    assert given.use_async_batching is None and passed[0] is not given
    assert passed[1].use_async_batching is False
    assert len([r for r in caplog.records if "double-buffering" in r.getMessage()]) == 1

    asked = transformers.ContinuousBatchingConfig(use_async_batching=True)
    patch.init_continuous_batching(model(), None, asked)
    assert passed[-1].use_async_batching is True
    carried = transformers.GenerationConfig()  # the deprecated way: a config carried by the GenerationConfig
    carried.continuous_batching_config = transformers.ContinuousBatchingConfig(num_blocks=8)
    patch.init_continuous_batching(model(), carried, None)
    assert passed[-1].num_blocks == 8 and passed[-1].use_async_batching is False
    for other in (model("sdpa"), model(device="cpu")):
        patch.init_continuous_batching(other, None, given)
        assert passed[-1] is given


def test_continuous_batching_patch_reverts():
    from transformers.generation import ContinuousMixin

    from hf_flash.patches import continuous_batching as patch

    patch.revert()
    try:
        assert ContinuousMixin.init_continuous_batching is patch._original_init
    finally:
        patch.apply()
    assert ContinuousMixin.init_continuous_batching is patch.init_continuous_batching

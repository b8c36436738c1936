"""torch.compile over an hf_flash model: a tiny random Llama compiled gives the eager model's logits on a left-padded
batch (transformers' flash path unpads it to attention_varlen, whose outputs were once written through a stride-0
expanded view, which AOT autograd refuses) and on an unpadded one. An unpadded prefill and a planned decode step over a
PagedCache compile whole (no graph break); a padded prefill breaks only in transformers' unpadding. On CPU the torch
path runs, as in the model tests."""
import pathlib

import pytest
import torch
from test_models import left_padded_batch, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend

import hf_flash
import hf_flash.kernels
from hf_flash import PagedCache
from hf_flash.internals import CACHE_NAME

pytestmark = pytest.mark.usefixtures("torch_path_on_cpu")

# Not the default inductor: it compiles here, but its CPU code generation starts in ~25 s and takes ~3 s for each
# graph (the fp32 flash path's breaks in transformers' unpadding and logging leave about 15; ~100 s on a 2-core CI box
# once). aot_eager runs the same dynamo capture and AOT autograd functionalization (where the stride-0 write failed,
# and where the custom ops' in-place writes are functionalized) in a few seconds.
BACKEND = "aot_eager"


@pytest.fixture(scope="module")
def llama():
    """One model, compiled once for both batches (same shape: only the attention path's graphs differ)."""
    torch._dynamo.reset()  # no graphs compiled for another module's models
    model, _ = tiny_model("llama")
    model.set_attn_implementation("hf_flash")
    yield model, torch.compile(model, backend=BACKEND)
    torch._dynamo.reset()


@pytest.mark.parametrize("lengths", [[13, 6, 2], [13, 13, 13]], ids=["left-padded", "unpadded"])
def test_compiled_model_matches_eager(lengths, llama, device):
    model, compiled = llama
    model.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch(lengths))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = compiled(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.isfinite(got[valid]).all()
    # fp32 end to end: the compiled graphs run the same ops, at most reordering sums (~1e-6 on these logits).
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=0)


@pytest.fixture
def bf16_llama():
    """The dtype flash attention serves: in fp32 transformers' flash path logs a warning_once (its cast of fp32
    inputs), a graph break of its own."""
    torch._dynamo.reset()
    model, _ = tiny_model("llama")
    model.set_attn_implementation("hf_flash")
    yield model.to(torch.bfloat16)
    torch._dynamo.reset()


def test_unpadded_prefill_compiles_whole(bf16_llama, device):
    """No cache, no padding mask: transformers' flash path calls flash_attn_func -> ops.attention -> the prefill op.
    fullgraph=True fails on any graph break."""
    model = bf16_llama.to(device)
    ids = torch.randint(1, 128, (3, 13), device=device)
    with torch.no_grad():
        got = torch.compile(model, backend=BACKEND, fullgraph=True)(input_ids=ids).logits
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# hf_flash's source folders (the package and its kernels), where no graph break may happen
_HF_FLASH_DIRS = tuple(str(pathlib.Path(m.__file__).parent) for m in (hf_flash, hf_flash.kernels))


def test_padded_prefill_breaks_only_in_transformers(bf16_llama, device):
    """A left-padded batch: transformers' unpadding (_get_unpad_data: nonzero and .item()) and its mask function
    (attention_mask.all()) break the graph; attention_varlen, given the bounds transformers computed, reads nothing."""
    model = bf16_llama.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([13, 6, 2]))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
    ours = [(reason.reason, reason.user_stack[-1]) for reason in explained.break_reasons
            if reason.user_stack[-1].filename.startswith(_HF_FLASH_DIRS)]
    assert not ours


def test_planned_decode_step_compiles_whole(bf16_llama, device):
    """A decode step over a PagedCache planned before the compiled region (begin_step and the plan's device tensors,
    as DecodeGraphs does; the plan holds the mask, which the step then leaves out) compiles whole: the layers take the
    open step's plan and its device tensors, and the ops read nothing on the host. Each step matches an eager step
    over a twin cache, also in the pages it writes (the next steps read them); after the first steps made the slots
    and block table width dynamic, the graph serves every step."""
    model = bf16_llama.to(device)
    ids, mask = (t.to(device) for t in left_padded_batch([13, 6, 2]))
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    eager_cache, compiled_cache = PagedCache(model.config, page_size=4), PagedCache(model.config, page_size=4)
    with torch.no_grad():
        for cache in (eager_cache, compiled_cache):
            logits = model(input_ids=ids, attention_mask=mask, **{CACHE_NAME: cache}).logits
        tokens = logits[:, -1:].argmax(-1)
        for _ in range(8):  # two pages of 4: the block table widens twice
            mask = torch.cat([mask, torch.ones_like(tokens)], 1)
            step = {"input_ids": tokens, "position_ids": mask.sum(-1, keepdim=True) - 1}
            want = model(**step, attention_mask=mask, **{CACHE_NAME: eager_cache}).logits
            # Host planning and its copies to the device (pinned on a GPU, which fake tensors cannot be) come before
            # the compiled region, as in DecodeGraphs.
            compiled_cache.begin_step(mask, 1, len(tokens)).on(ids.device)
            got = compiled(**step, **{CACHE_NAME: compiled_cache}).logits
            compiled_cache.commit_step()
            torch.testing.assert_close(got, want, atol=0, rtol=0)
            tokens = want.argmax(-1)
    assert counter.frame_count <= 3  # the first graph, then dynamic slots, then a dynamic block table width

"""hf_flash's decode loop: what ``generate()`` runs for greedy search and sampling over a ``PagedCache`` on CUDA.

gpt-fast's design: prefill the prompt, then one step per token, each step the model's forward *and* the choice of the
next token (``hf_flash.graphs.decode_step``: the logits processors that read only the scores, then argmax or a
sample), compiled whole by torch.compile and replayed as one CUDA graph. Per step the host plans the cache (pages,
slots), replays, commits, appends the token and asks the stopping criteria. The host never waits for the step it just
queued: criteria that read the tokens (an EOS, a stop string) give their verdict a step late, and when every sequence
has finished the one step queued past the end is undone (its token dropped, the cache cropped), as transformers' own
deferred stop check does (that step has drawn its sample: after a sampled call stopped by a criterion, the random
generator is one step further on than after transformers' loop).

``sample`` takes the place of ``GenerationMixin._sample`` (``hf_flash.patches.generate``). Whatever it does not cover
goes to transformers' own loop, whose decode steps still replay graphs of the forward (``DecodeGraphs``), and the
reason is logged once: outputs beyond the sequences (scores, logits, attentions, hidden states), a logits processor
that reads the ids (repetition penalty, n-gram bans, minimum length...) or holds a tensor (suppressed tokens),
assistants, encoder-decoders, synced GPUs, model inputs other than the text's ids, mask and positions, and positions
that do not continue from the count of each sequence's valid tokens (the compiled step's positions: transformers'
default ones do).
"""
import torch
from transformers.generation import logits_process
from transformers.generation.stopping_criteria import MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import graphs
from .internals import CACHE_NAME

# Logits processors that read the scores only (never the ids, nor the step): the compiled step applies them.
SCORES_ONLY_PROCESSORS = tuple(getattr(logits_process, name) for name in (
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper", "SuppressTokensLogitsProcessor", "LogitNormalization"))
# Model inputs the loop knows how to carry on: every step's position is the count of the valid tokens before it.
_TEXT_INPUTS = {"attention_mask", "position_ids", "cache_position"}
# Outputs of generate() that the loop does not produce.
_EXTRA_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


class TokenSelector:
    """The next token from the last position's logits: the scores-only processors, then argmax (greedy) or a sample
    from the softmax. Called eagerly after the prefill and inside every compiled step."""

    def __init__(self, processors, do_sample):
        self.processors, self.do_sample = tuple(processors), bool(do_sample)

    def __call__(self, logits):
        scores = logits.float()
        for processor in self.processors:
            scores = processor(None, scores)
        if not self.do_sample:
            return scores.argmax(-1)
        probs = torch.softmax(scores, dim=-1)
        # What torch.multinomial(probs, 1) draws (its one-sample path: argmax of probs / Exp(1) noise, from the same
        # generator), without its host-side check of the probabilities, which a graph cannot hold.
        return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)

    def signature(self):
        """What a captured step depends on besides the inputs (a graph key)."""
        return self.do_sample, tuple((type(p).__name__, tuple(sorted(map(repr, vars(p).items()))))
                                     for p in self.processors)


def why_not_compiled(model, logits_processor, generation_config, synced_gpus, model_kwargs):
    """Why this ``_sample`` call cannot run hf_flash's compiled loop (None if it can)."""
    if synced_gpus:
        return "synced_gpus"
    if model.config.is_encoder_decoder or generation_config.is_assistant:
        return "an encoder-decoder model or an assistant model"
    extra = [name for name in _EXTRA_OUTPUTS if getattr(generation_config, name, False)]
    if generation_config.return_dict_in_generate and extra:
        return f"{', '.join(extra)} asked for"
    # Exact types: a subclass may read the ids in a __call__ of its own.
    readers = [type(p).__name__ for p in logits_processor if type(p) not in SCORES_ONLY_PROCESSORS]
    if readers:
        return f"logits processors that read the generated ids ({', '.join(readers)})"
    # A graph reads a processor's tensor (suppressed token ids) at the address it had when captured; the graphs of a
    # caller's cache serve its later calls, whose processors are new objects.
    holders = [type(p).__name__ for p in logits_processor if any(isinstance(v, torch.Tensor) for v in vars(p).values())]
    if holders:
        return f"logits processors holding tensors ({', '.join(holders)})"
    inputs = sorted(name for name, value in model_kwargs.items()
                    if isinstance(value, torch.Tensor) and name not in _TEXT_INPUTS)
    if inputs:
        return f"model inputs besides the ids, mask and positions ({', '.join(inputs)})"
    if not _positions_count_valid_tokens(model_kwargs.get("position_ids"), model_kwargs.get("attention_mask")):
        return "position_ids that do not end at each sequence's count of valid tokens minus one"
    return None


def _positions_count_valid_tokens(positions, mask):
    """Whether every sequence's next position in transformers' loop (its last given one plus one) is the count of its
    valid tokens, as each compiled step takes it from the cache. transformers' default positions (the mask's running
    count) are; a caller's own may start elsewhere. One host read, before the prefill."""
    if positions is None:
        return True
    if positions.dim() != 2:  # several position streams per token (multimodal rotary)
        return False
    valid = mask.sum(-1) if mask is not None else positions.shape[-1]
    return bool((positions[:, -1] + 1 == valid).all())


def sample(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs):
    """Greedy search or sampling over the ``PagedCache`` in ``model_kwargs``: the prompt prefilled, every further token
    from one compiled and graphed step. Returns what ``_sample`` returns: the sequences, or
    ``GenerateDecoderOnlyOutput`` with the sequences and the cache."""
    cache = model_kwargs[CACHE_NAME]
    select = TokenSelector(logits_processor, generation_config.do_sample)
    batch, prompt_length = input_ids.shape
    # As transformers' loop: sequences an EOS criterion finished get padding.
    eos_stops = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    pad = generation_config._pad_token_tensor if eos_stops else None
    # Only the length is known without waiting for the GPU: any other criterion's verdict (a subclass of
    # MaxLengthCriteria's too) is read at every step. A caller's MaxLengthCriteria replaces generate()'s own.
    reads_tokens = any(type(c) is not MaxLengthCriteria for c in stopping_criteria)
    max_length = min((c.max_length for c in stopping_criteria if type(c) is MaxLengthCriteria),
                     default=generation_config.max_length)
    sequences = input_ids.new_empty((batch, max(max_length, prompt_length + 1)))
    sequences[:, :prompt_length] = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    logits = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True).logits
    tokens = select(logits[:, -1])
    del logits  # the prefill's logits may be large
    length = prompt_length
    step = graphs.compiled(graphs.decode_step, input_ids.device, generation_config.compile_config)
    key = (graphs.model_key(model), ("decode", select.signature(), step))  # another compile_config: its own graphs

    def next_tokens_after(tokens):
        """One step: planned, run (compiled, graphed), committed; aborted if anything raises."""
        new_ids = tokens[:, None]
        return graphs.run_step(lambda ids, positions: step(model, cache, ids, positions, select), key, cache,
                               cache.begin_step(None, 1, batch), new_ids)  # begun last: run_step ends it

    verdict = _Verdict(input_ids.device) if reads_tokens else None
    with model._optimize_model_for_decode():
        while True:
            if pad is not None:
                tokens = torch.where(unfinished, tokens, pad)
            sequences[:, length] = tokens
            length += 1
            unfinished &= ~stopping_criteria(sequences[:, :length], None).bool()  # a criterion may answer in ints
            # Streamed from their copy in the sequences: the next replay overwrites ``tokens`` (the graph's output).
            if length >= sequences.shape[1]:
                _stream(streamer, sequences[:, length - 1])
                break
            if verdict is not None:
                verdict.record(unfinished)
                # A caller's pool that holds exactly the tokens of a call stopping here has no room for the step
                # queued past the end: wait for the verdict first.
                if not cache.fits_one_more_token() and verdict.all_finished():
                    _stream(streamer, sequences[:, length - 1])
                    break
            # The next step is queued before the host waits for this one's tokens or verdict: the GPU never idles.
            next_tokens = next_tokens_after(tokens)
            _stream(streamer, sequences[:, length - 1])
            if verdict is not None and verdict.all_finished():
                cache.crop(-1)  # the step just queued is one past the end: its token is dropped, and its K/V
                break
            tokens = next_tokens
    if streamer is not None:
        streamer.end()
    sequences = sequences[:, :length].contiguous()  # as transformers' (callers view it), not holding the buffer
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences, **{CACHE_NAME: cache})
    return sequences


class _Verdict:
    """Whether every sequence has finished, copied to the host behind the queued work and read a step later, as
    transformers' ``DeferredStopCheck`` does on mps."""

    def __init__(self, device):
        self.finished = torch.zeros((), dtype=torch.bool, pin_memory=device.type == "cuda")
        self.copied = torch.cuda.Event() if device.type == "cuda" else None

    def record(self, unfinished):
        self.finished.copy_(~unfinished.any(), non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def all_finished(self):
        if self.copied is not None:
            self.copied.synchronize()
        return bool(self.finished)


def _stream(streamer, tokens):
    if streamer is not None:
        streamer.put(tokens.cpu())

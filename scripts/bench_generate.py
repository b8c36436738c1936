"""End-to-end ``generate()`` speed and memory: hf_flash (its default PagedCache) beside stock transformers ``sdpa``
with a DynamicCache and with ``cache_implementation="static"``, on Llama-3-shaped models with random bf16 weights
built from configs (nothing is downloaded).

Greedy decoding of exactly the asked number of new tokens (no EOS) for a batch of random prompts without padding.
For each model, shape and implementation: one warm-up call of the same shape (for "static" it includes
torch.compile, which transformers starts by itself on CUDA), then the medians of 3 full calls and of 3 calls with
max_new_tokens=1 (the prefill: time to first token). Reported:
    prefill s           time to first token
    decode tok/s        B * (new - 1) / (total - prefill)
    e2e tok/s           B * new / total, and as a multiple of sdpa's
    peak GiB            torch.cuda.max_memory_allocated during a full call (weights included)
    KV GiB              the cache's tensors after the call (PagedCache: its pools; StaticCache: its full-length
                        buffers); used: the pages holding tokens (PagedCache.memory_stats())
    1st call +s         how much longer the warm-up took than a timed call: compile time for "static"
The default set is meant to take under 8 minutes on an H100; static's compiles are the least certain part of that
("--skip static" leaves them out; "--models 1b" leaves out the large model).
    python scripts/bench_generate.py --out bench_generate.json
    python scripts/bench_generate.py --models 1b --shapes 4x1024x64
    python scripts/bench_generate.py --device cpu --quick          # checks the script on a tiny model
"""
import argparse
import statistics
import sys
import time
import traceback

import torch
import transformers
from bench_common import Table, begin, cell, free_memory, progress, say, synchronize

import hf_flash

GIB = 2**30
LLAMA3 = {"vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072}
MODELS = {  # LlamaConfig arguments
    "1b": {**LLAMA3, "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "tie_word_embeddings": True},
    "8b": {**LLAMA3, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
           "tie_word_embeddings": False},
    "tiny": {"vocab_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128},
}
IMPLS = ("sdpa", "hf_flash", "static")  # static last: its compiles take longest


def parse_shape(text):
    """'16x2048x256' -> (batch, prompt length, new tokens)."""
    try:
        batch, prompt, new = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxPROMPTxNEW, e.g. 16x2048x256, got {text!r}") from None
    if min(batch, prompt, new) < 1:
        raise argparse.ArgumentTypeError(f"batch, prompt and new tokens must be positive, got {text!r}")
    return batch, prompt, new


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,8b",
                        help="comma-separated among 1b (Llama-3.2-1B-shaped), 8b (Llama-3-8B-shaped); "
                             "default: 1b,8b (the small one first)")
    parser.add_argument("--shapes", default="16x2048x256,8x8192x128",
                        help="comma-separated BATCHxPROMPTxNEW (default: 16x2048x256,8x8192x128)")
    parser.add_argument("--new-tokens", type=int, help="new tokens for every shape, replacing each shape's own")
    parser.add_argument("--skip", default="",
                        help="comma-separated implementations to leave out, among sdpa, hf_flash, static")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement; the median is reported")
    parser.add_argument("--out", help="write the results as JSON to this file (rewritten after every row)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random Llama and shape 2x32x8, to check the script (e.g. on a CPU)")
    args = parser.parse_args(argv)
    args.shapes = [parse_shape(s) for s in args.shapes.split(",")]
    args.models = args.models.split(",")
    if args.quick:
        args.models, args.shapes = ["tiny"], [(2, 32, 8)]
    if args.new_tokens is not None:
        args.shapes = [(b, p, args.new_tokens) for b, p, _ in args.shapes]
    skip = set(args.skip.split(",")) - {""}
    unknown = (set(args.models) - set(MODELS)) | (skip - set(IMPLS))
    if unknown:
        parser.error(f"unknown models or implementations: {', '.join(sorted(unknown))}")
    args.impls = [i for i in IMPLS if i not in skip]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.device = torch.device(args.device)
    return args


def build_model(name, device):
    """Random bf16 weights, made on the device (no host copy of 16 GB); no EOS, so every call makes all its tokens."""
    config = transformers.LlamaConfig(**MODELS[name], bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def kv_bytes(cache):
    """(bytes of the cache's tensors, bytes holding tokens where the cache says so)."""
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                    if isinstance(t, torch.Tensor))
    if isinstance(cache, hf_flash.PagedCache):
        return allocated, cache.memory_stats()["bytes_used"]
    return allocated, None


def generate(model, inputs, impl, new_tokens, device):
    """One timed ``generate``: (seconds, peak bytes, (KV bytes allocated, used))."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         cache_implementation="static" if impl == "static" else None, return_dict_in_generate=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    if out.sequences.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
        raise RuntimeError(f"generate made {out.sequences.shape[1] - inputs['input_ids'].shape[1]} tokens, "
                           f"not {new_tokens}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak, kv_bytes(out.past_key_values)


def measure(model, inputs, impl, new_tokens, repeats, device):
    """Warm-up, timed full calls and timed prefill-only calls of one implementation at one shape."""
    model.set_attn_implementation("hf_flash" if impl == "hf_flash" else "sdpa")
    if impl == "static":
        # transformers sizes a static cache to the longest of this model's earlier static calls (to spare
        # recompiles): forget them, so each shape gets a cache of its own length.
        model.__dict__.pop("_previous_max_cache_length", None)
    warmup_s, _, _ = generate(model, inputs, impl, new_tokens, device)
    full = [generate(model, inputs, impl, new_tokens, device) for _ in range(repeats)]
    prefill = [generate(model, inputs, impl, 1, device)[0] for _ in range(repeats)]
    total_s = statistics.median(s for s, _, _ in full)
    prefill_s = statistics.median(prefill)
    batch = inputs["input_ids"].shape[0]
    peaks = [p for _, p, _ in full if p is not None]
    kv_allocated, kv_used = full[-1][2]
    return {"total_s": total_s, "prefill_s": prefill_s, "warmup_s": warmup_s, "first_call_extra_s": warmup_s - total_s,
            "decode_tok_s": batch * (new_tokens - 1) / (total_s - prefill_s) if new_tokens > 1 else None,
            "e2e_tok_s": batch * new_tokens / total_s, "peak_bytes": max(peaks) if peaks else None,
            "kv_bytes": kv_allocated, "kv_bytes_used": kv_used,
            "total_s_all": [s for s, _, _ in full], "prefill_s_all": prefill}


def forget_compiled(model, device):
    """Drop the static runs' compiled forward and CUDA graphs, so the next shape starts clean and their memory
    pools do not count in the next implementation's peak."""
    model.__dict__.pop("_compiled_call", None)
    torch._dynamo.reset()
    free_memory(device)


def main(argv=None):
    args = parse_args(argv)
    start, results = begin(args)
    table = Table([("model", 5), ("B", 3), ("prompt", 6), ("new", 4), ("impl", 8), ("prefill s", 9),
                   ("decode tok/s", 12), ("e2e tok/s", 9), ("x sdpa", 6), ("peak GiB", 8), ("KV GiB", 6),
                   ("used", 6), ("1st call +s", 11)])
    failures = 0
    for name in args.models:
        model = build_model(name, args.device)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        say(f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
            f"{weights / GIB:.1f} GiB of bf16 weights")
        table.header()
        for batch, prompt, new_tokens in args.shapes:
            torch.manual_seed(0)
            ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=args.device)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            e2e_sdpa = None
            for impl in progress(args.impls, desc=f"{name} {batch}x{prompt}x{new_tokens}"):
                record = {"model": name, "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "impl": impl,
                          "weights_bytes": weights}
                impl_start = time.perf_counter()
                try:
                    record.update(measure(model, inputs, impl, new_tokens, args.repeats, args.device))
                except Exception as e:  # noqa: BLE001  (one failing implementation must not lose the others' numbers)
                    failures += 1
                    traceback.print_exc()
                    record["error"] = f"{type(e).__name__}: {e}"
                    table.row(name, batch, prompt, new_tokens, impl, f"failed: {type(e).__name__}")
                else:
                    if impl == "sdpa":
                        e2e_sdpa = record["e2e_tok_s"]
                    record["e2e_vs_sdpa"] = record["e2e_tok_s"] / e2e_sdpa if e2e_sdpa else None
                    table.row(name, batch, prompt, new_tokens, impl, cell(record["prefill_s"], ".3f"),
                              cell(record["decode_tok_s"], ".0f"), cell(record["e2e_tok_s"], ".0f"),
                              cell(record["e2e_vs_sdpa"], ".2f"),
                              cell(None if record["peak_bytes"] is None else record["peak_bytes"] / GIB, ".1f"),
                              cell(record["kv_bytes"] / GIB, ".2f"),
                              cell(None if record["kv_bytes_used"] is None else record["kv_bytes_used"] / GIB, ".2f"),
                              cell(record["first_call_extra_s"], ".1f"))
                record["wall_s"] = time.perf_counter() - impl_start  # where the run's minutes went
                results.add("generate", record)
                if impl == "static":
                    forget_compiled(model, args.device)
                free_memory(args.device)
            del ids, inputs
        del model
        free_memory(args.device)
    say("impl: sdpa = DynamicCache, static = cache_implementation='static' (torch.compile on CUDA), hf_flash = "
        "PagedCache; x sdpa: e2e tok/s over sdpa's; KV GiB: the cache's tensors, used: pages holding tokens; "
        "1st call +s: the warm-up call's time over a timed call's (for static: mostly torch.compile)")
    results.set("elapsed_s", time.perf_counter() - start)
    say(f"\ndone in {time.perf_counter() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

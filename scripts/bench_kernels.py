"""hf_flash's attention kernels beside PyTorch's, on the same inputs in one run (bf16).

prefill: TFLOP/s of ``hf_flash.attention`` and of SDPA's flash, cuDNN and memory-efficient backends and
    FlexAttention (compiled once; causal through a block mask made once per shape; compile time not timed), for head
    dims 64 and 128, causal and not, sequence lengths 1k..16k with batch x length = 16k tokens and heads x head dim =
    2048 (FlashAttention's benchmark grid). FLOPs: 4 * B * H * S^2 * D, halved when causal. Each shape also prints
    how far our output is from SDPA's (max abs difference).
decode: TB/s of one query token per sequence over a KV cache (GQA 32/8 heads, head dim 128): hf_flash's paged decode
    (``attention_with_kvcache`` over a block table of shuffled pages, page sizes 16 and 64, split count from its own
    heuristic) beside SDPA's backends and FlexAttention on contiguous caches. Bytes: the K and V that the sequence
    lengths cover; ours is also shown as a share of the device-to-device copy bandwidth measured in the same run.

Times are medians of triton.testing.do_bench (warm-up 25 ms, 100 ms of runs). A backend that refuses the inputs
shows n/a, with its error after the table. Meant to take under 4 minutes on an H100, FlexAttention's compiles (one
per shape, printed apart) included.
    python scripts/bench_kernels.py --out bench_kernels.json
    python scripts/bench_kernels.py --device cpu --quick          # checks the script on tiny shapes (torch path)
"""
import argparse
import contextlib
import functools
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from bench_common import (Table, begin, bench_graph_ms, bench_ms, cell, copy_bandwidth, free_memory, progress, say,
                          synchronize)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import hf_flash

DTYPE = torch.bfloat16
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}  # None: PyTorch picks
ANCHORS = {"prefill": ("flash", "cudnn", "efficient", "flex"), "decode": ("cudnn", "flash", "efficient", "default", "flex")}

# prefill: (tokens = B * S, width = H * D, sequence lengths, head dims)
PREFILL = {"full": (16384, 2048, (1024, 2048, 4096, 8192, 16384), (64, 128)),
           "quick": (256, 256, (64, 128), (64, 128))}
# decode: (query heads, KV heads, head dim, [(batch, context length)], page sizes); every length is a multiple of
# every page size, so a contiguous cache reshapes into whole pages.
DECODE = {"full": (32, 8, 128, [(1, 4096), (1, 65536), (8, 16384), (32, 4096), (64, 8192), (128, 2048)], (16, 64)),
          "quick": (32, 8, 128, [(1, 256), (2, 128)], (16, 64))}
COPY_BYTES = {"full": 1 << 30, "quick": 1 << 24}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=("prefill", "decode", "all"), default="all",
                        help="which benchmark to run (default: all)")
    parser.add_argument("--backends", default="flash,cudnn,efficient,default,flex",
                        help="comma-separated anchors to time beside hf_flash, among flash, cudnn, efficient, default "
                             "(SDPA's own choice; decode only) and flex (default: all)")
    parser.add_argument("--out", help="write the results as JSON to this file (rewritten after every row)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script (e.g. on a CPU)")
    args = parser.parse_args(argv)
    args.backends = args.backends.split(",") if args.backends else []
    unknown = set(args.backends) - set(SDPA_BACKENDS) - {"flex"}
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    args.device = torch.device(args.device)
    args.size = "quick" if args.quick else "full"
    return args


def sdpa(backend, q, k, v, **kwargs):
    """``F.scaled_dot_product_attention`` restricted to one SDPA backend (None: no restriction)."""
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


class Runner:
    """Runs each backend once (compiles and JIT happen there, untimed; its wall time is kept) and then times it.
    A backend that raises is n/a; its first error message per backend is kept for the notes."""

    def __init__(self, device):
        self.device = device
        self.errors = {}  # backend -> first error message
        self.first_call_s = {}  # backend -> summed first-call seconds (FlexAttention: its compiles)

    def run(self, name, fn, label=None, graph=False):
        """(output of the first call, median ms), or (None, None) if ``fn`` raises; its error is noted under
        ``label`` (default: ``name``)."""
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # SDPA's warnings say why a backend refuses: kept for the notes
                start = time.perf_counter()
                out = fn()
                synchronize(self.device)
            self.first_call_s[name] = self.first_call_s.get(name, 0.0) + time.perf_counter() - start
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return out, (bench_graph_ms if graph else bench_ms)(fn, self.device)
        except Exception as e:  # noqa: BLE001  (refusals range from ValueError to compile errors)
            reasons = dict.fromkeys(" ".join(str(w.message).split()) for w in caught)
            message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            message += f" [{'; '.join(reasons)}]" if reasons else ""
            self.errors.setdefault(label or name, message[:600])
            if name == "ours":  # ours must run everywhere: say at once, not in the notes
                say(f"hf_flash failed: {message}")
            free_memory(self.device)  # an out-of-memory backend must not starve the next one
            return None, None

    def notes(self):
        for name, message in self.errors.items():
            say(f"  {name} n/a: {message}")


def max_abs_diff(a, b):
    return None if a is None or b is None else (a.float() - b.float()).abs().max().item()


def bench_prefill(args, results, flex):
    tokens, width, seqlens, head_dims = PREFILL[args.size]
    anchors = [a for a in ANCHORS["prefill"] if a in args.backends]
    runner = Runner(args.device)
    table = Table([("D", 4), ("S", 6), ("B", 3), ("H", 3), ("causal", 6), ("ours", 6),
                   *[(a, 9) for a in anchors], ("/flash", 6), ("/cudnn", 6), ("maxdiff", 8)])
    say(f"\nprefill: TFLOP/s, bf16, {tokens} tokens per batch (B x S), H x D = {width}")
    table.header()
    cases = [(d, s) for d in head_dims for s in seqlens]
    for head_dim, seqlen in progress(cases, desc="prefill"):
        batch, heads = tokens // seqlen, width // head_dim
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=args.device, dtype=DTYPE) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views, as transformers passes them
        for causal in (False, True):
            flops = 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
            fns = {"ours": functools.partial(hf_flash.attention, q, k, v, causal=causal)}
            for name in anchors:
                if name == "flex":
                    mask = None
                    if causal:
                        mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seqlen,
                                                 seqlen, device=args.device)
                    fns[name] = functools.partial(flex, qt, kt, vt, block_mask=mask)
                else:
                    fns[name] = functools.partial(sdpa, SDPA_BACKENDS[name], qt, kt, vt, is_causal=causal)
            ours_out, ms = runner.run("ours", fns.pop("ours"))
            tflops = {"ours": None if ms is None else flops / (ms * 1e-3) / 1e12}
            for name, fn in fns.items():
                _, anchor_ms = runner.run(name, fn)
                tflops[name] = None if anchor_ms is None else flops / (anchor_ms * 1e-3) / 1e12
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference = sdpa(None, qt, kt, vt, is_causal=causal).transpose(1, 2)
            diff = max_abs_diff(ours_out, reference)
            ratios = {a: tflops["ours"] / tflops[a] if tflops["ours"] and tflops.get(a) else None
                      for a in ("flash", "cudnn")}
            table.row(head_dim, seqlen, batch, heads, "yes" if causal else "no", cell(tflops["ours"], ".0f"),
                      *[cell(tflops[a], ".0f") for a in anchors], cell(ratios["flash"], ".2f"),
                      cell(ratios["cudnn"], ".2f"), cell(diff, ".1e"))
            results.add("prefill", {"head_dim": head_dim, "seqlen": seqlen, "batch": batch, "heads": heads,
                                    "causal": causal, "tflops": tflops, "ours_over": ratios, "max_abs_diff": diff})
            del ours_out, reference, fns
        del q, k, v, qt, kt, vt
        free_memory(args.device)
    say("ratios: ours / flash and ours / cudnn TFLOP/s; maxdiff: max |ours - SDPA| over the outputs")
    if "flex" in anchors:
        say(f"FlexAttention compiles (first calls, not timed): {runner.first_call_s.get('flex', 0.0):.0f} s")
    runner.notes()
    results.set("prefill_errors", runner.errors)
    return "ours" not in runner.errors


def bench_decode(args, results, flex):
    heads, kv_heads, head_dim, shapes, page_sizes = DECODE[args.size]
    group = heads // kv_heads
    anchors = [a for a in ANCHORS["decode"] if a in args.backends]
    runner = Runner(args.device)
    copy_tbps = copy_bandwidth(args.device, COPY_BYTES[args.size])
    results.set("copy_tbps", copy_tbps)
    say(f"\ndecode: TB/s of K+V read, bf16, GQA {heads}/{kv_heads} heads, head dim {head_dim}; "
        f"device-to-device copy {copy_tbps:.2f} TB/s (read + write)")
    table = Table([("B", 4), ("L", 6), *[c for p in page_sizes for c in ((f"ours p{p}", 8), ("%copy", 5))],
                   *[(a, 9) for a in anchors], ("maxdiff", 8)])
    table.header()
    repeated_kv = set()  # anchors that refused GQA and ran on K/V repeated to all query heads
    for batch, seqlen in progress(shapes, desc="decode"):
        q = torch.randn(batch, 1, heads, head_dim, device=args.device, dtype=DTYPE)
        k, v = (torch.randn(batch, kv_heads, seqlen, head_dim, device=args.device, dtype=DTYPE) for _ in range(2))
        qt = q.transpose(1, 2)  # [B, Hq, 1, D]
        nbytes = 2 * k.numel() * k.element_size()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = sdpa(None, qt, k, v, enable_gqa=True).transpose(1, 2)
        tbps, diffs = {}, []
        for page_size in page_sizes:
            # The cache's pages scattered over the pool in random order, as after many sequences came and went.
            pages = seqlen // page_size
            block_table = torch.randperm(batch * pages, device=args.device).to(torch.int32).view(batch, pages)
            k_pool, v_pool = (torch.empty(batch * pages, page_size, kv_heads, head_dim, device=args.device, dtype=DTYPE)
                              for _ in range(2))
            for pool, t in ((k_pool, k), (v_pool, v)):
                pool[block_table.flatten().long()] = t.transpose(1, 2).reshape(batch * pages, page_size, kv_heads, head_dim)
            seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=args.device)
            out, ms = runner.run("ours", functools.partial(hf_flash.attention_with_kvcache, q, k_pool, v_pool, seqlens,
                                                           block_table, max_seqlen_k=seqlen), graph=True)
            tbps[f"ours_p{page_size}"] = None if ms is None else nbytes / (ms * 1e-3) / 1e12
            diffs.append(max_abs_diff(out, reference))
            del k_pool, v_pool, out
            free_memory(args.device)
        kr = vr = None
        repeated_here = []
        for name in anchors:
            run = flex if name == "flex" else functools.partial(sdpa, SDPA_BACKENDS[name])
            _, ms = runner.run(name, functools.partial(run, qt, k, v, enable_gqa=True), label=f"{name} with GQA",
                               graph=True)
            if ms is None:  # no GQA in this backend: give it K/V repeated to every query head, count 8-head bytes
                if kr is None:
                    kr, vr = (t.repeat_interleave(group, dim=1) for t in (k, v))
                _, ms = runner.run(name, functools.partial(run, qt, kr, vr), graph=True)
                if ms is not None:
                    repeated_here.append(name)
            tbps[name] = None if ms is None else nbytes / (ms * 1e-3) / 1e12
        repeated_kv.update(repeated_here)
        mark = {a: "*" if a in repeated_here else "" for a in anchors}
        diff = max((d for d in diffs if d is not None), default=None)
        pct = {p: None if tbps[f"ours_p{p}"] is None else 100 * tbps[f"ours_p{p}"] / copy_tbps for p in page_sizes}
        table.row(batch, seqlen, *[c for p in page_sizes for c in (cell(tbps[f"ours_p{p}"], ".2f"), cell(pct[p], ".0f"))],
                  *[cell(tbps[a], ".2f") + mark[a] for a in anchors], cell(diff, ".1e"))
        results.add("decode", {"batch": batch, "seqlen": seqlen, "heads": heads, "kv_heads": kv_heads,
                               "head_dim": head_dim, "kv_bytes": nbytes, "tbps": tbps, "ours_pct_of_copy": pct,
                               "repeated_kv": repeated_here, "max_abs_diff": diff})
        del q, k, v, qt, kr, vr, reference
        free_memory(args.device)
    say("Decode times are CUDA-graph replays for every backend (launch overhead excluded alike).")
    say("TB/s: K+V bytes the sequence lengths cover over the median time (q and out add at most 0.2%); ours p16/p64: "
        "page size; %copy: ours over the copy bandwidth; maxdiff: max |ours - SDPA| over both page sizes")
    if repeated_kv:
        say(f"* {', '.join(sorted(repeated_kv))} refused GQA (enable_gqa=True) and ran on K/V repeated to {heads} "
            f"heads, reading {group}x the bytes; its TB/s still counts the {kv_heads}-head K/V, like the others'")
    if "flex" in anchors:
        say(f"FlexAttention compiles (first calls, not timed): {runner.first_call_s.get('flex', 0.0):.0f} s")
    runner.notes()
    results.set("decode_errors", runner.errors)
    return "ours" not in runner.errors


def main(argv=None):
    args = parse_args(argv)
    start, results = begin(args)
    # One compiled FlexAttention for every shape. Static shapes (dynamic=False) give each shape its own kernel, as
    # a model with a fixed length would get; the shapes here need more graphs than dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    ok = True
    if args.section in ("prefill", "all"):
        ok &= bench_prefill(args, results, flex)
    if args.section in ("decode", "all"):
        ok &= bench_decode(args, results, flex)
    results.set("elapsed_s", time.perf_counter() - start)
    say(f"\ndone in {time.perf_counter() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    return 0 if ok else 1  # hf_flash failing on some shape fails the run; anchors may be n/a


if __name__ == "__main__":
    sys.exit(main())

"""hf_flash's attention kernels beside PyTorch's, on the same inputs in one run, per dtype (--dtypes, default bf16).

prefill: TFLOP/s of ``hf_flash.attention`` and of SDPA's flash, cuDNN and memory-efficient backends and
    FlexAttention (compiled once, eager on a CPU; causal through a block mask made once per shape; compile time not
    timed), causal and not, B x S = 16k tokens: head dims 64 and 128 at H x D = 2048 and sequence lengths 1k..16k
    (FlashAttention's benchmark grid); GQA with 32 query / 8 KV heads at head dim 128 (Llama-3-8B's) at 1k, 4k and
    16k, the anchors given ``enable_gqa=True``; head dim 256 (8 heads) at 1k and 4k. FLOPs: 4 * B * H * S^2 * D (H:
    query heads), halved when causal. Each row prints how far our output is from SDPA's (max abs difference), and
    our host time per call beside the measured time of a call (host-bound rows time the host, not the kernel).
varlen: TFLOP/s over a ragged batch: sequences of random lengths (fixed seed) packed back to back into 16k tokens,
    16 heads of 128, through ``hf_flash.attention_varlen``, beside PyTorch's own ragged paths on the same packed
    tokens: SDPA's backends on nested (jagged) tensors, and FlexAttention on the packed batch with a document mask
    (block-sparse: it skips the blocks across sequences). "padded": ``hf_flash.attention`` on the batch padded to its
    longest sequence, what varlen saves. FLOPs: the sum over the sequences of 4 * H * S^2 * D (halved when causal), for
    every column (padding is no useful work). Times include each call's host work, as in prefill (ours reads the
    offsets: one host sync). maxdiff: against SDPA on each sequence apart.
append: paged prefill, as in chunked prefill or a chat's next turn: N new query tokens per sequence attend to the L
    tokens already cached and causally to themselves (mask aligned to the bottom-right corner, as flash-attn's), GQA
    32/8 heads of 128. ``hf_flash.attention_with_kvcache`` with q of N tokens over K/V pools holding all L + N tokens
    in shuffled pages of 16 and 64 (p16, p64); "+write" is the same call given the new K/V to write into the pages of
    16 first (flash-attn's append). Beside it "dense": ``hf_flash.attention`` on the same q and contiguous K/V of L + N
    tokens (causal, bottom-right aligned); "/dense": time of the dense call over the paged one. FLOPs: 4 * B * H * D *
    (N * L + N^2 / 2). maxdiff: against SDPA with a bottom-right causal mask, over every hf_flash column.
decode: TB/s of one query token per sequence over a KV cache (GQA 32/8 heads, head dim 128): hf_flash's paged decode
    (``attention_with_kvcache`` over a block table of shuffled pages, page sizes 16 and 64, split count from its own
    heuristic, shown as "splits": ``hf_flash.ops.choose_num_splits``) beside SDPA's backends and FlexAttention on
    contiguous caches. Bytes: the K and V that the sequence lengths cover; ours is also shown as a share of the
    device-to-device copy bandwidth measured in the same run.

Times are medians of triton.testing.do_bench (warm-up 25 ms, 100 ms of runs). A backend that refuses the inputs
shows n/a, with its error after the table; one that refuses GQA runs on K/V repeated to every query head (marked *).
Every JSON row carries its dtype. Meant to take about 5 minutes on an H200 with the defaults, most of it
FlexAttention's ~40 compiles (one per shape, mask and dtype; printed apart): an estimate from the 4 minutes of the
earlier prefill and decode sections on an H100, not yet timed. --dtypes bf16,fp16 doubles it; --section and
--backends (flash,cudnn,default: no compiles) shorten it.
    python scripts/bench_kernels.py --out bench_kernels.json
    python scripts/bench_kernels.py --dtypes bf16,fp16 --section prefill,append --backends cudnn,flash
    python scripts/bench_kernels.py --device cpu --quick          # checks the script on tiny shapes (torch path)
"""
import argparse
import contextlib
import functools
import itertools
import logging
import random
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from bench_common import (Table, begin, bench_graph_ms, bench_ms, cell, copy_bandwidth, free_memory, host_us, progress,
                          say, synchronize)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import hf_flash
from hf_flash.ops import choose_num_splits

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}  # None: PyTorch picks
ANCHORS = {"prefill": ("flash", "cudnn", "efficient", "flex"), "varlen": ("flash", "cudnn", "efficient", "flex"),
           "append": (), "decode": ("cudnn", "flash", "efficient", "default", "flex")}

SEQLENS = (1024, 2048, 4096, 8192, 16384)
# prefill: (tokens = B * S, [(head dim, query heads, KV heads, sequence lengths)])
PREFILL = {"full": (16384, [(64, 32, 32, SEQLENS), (128, 16, 16, SEQLENS), (128, 32, 8, (1024, 4096, 16384)),
                            (256, 8, 8, (1024, 4096))]),
           "quick": (256, [(64, 4, 4, (64, 128)), (128, 2, 2, (64, 128)), (128, 4, 2, (64, 128)), (256, 1, 1, (64,))])}
# varlen: (packed tokens, heads, head dim, (shortest, longest) sequence drawn)
VARLEN = {"full": (16384, 16, 128, (64, 4096)), "quick": (256, 2, 64, (8, 96))}
# append: (query heads, KV heads, head dim, [(batch, cached tokens L, new tokens N)], page sizes); every L + N is a
# multiple of every page size, so the contiguous K/V reshape into whole pages.
APPEND = {"full": (32, 8, 128, [(1, 16384, 2048), (4, 8192, 2048), (8, 4096, 512), (32, 2048, 512)], (16, 64)),
          "quick": (4, 2, 64, [(1, 128, 64), (2, 96, 32)], (16, 64))}
# decode: (query heads, KV heads, head dim, [(batch, context length)], page sizes); every length is a multiple of
# every page size, so a contiguous cache reshapes into whole pages.
DECODE = {"full": (32, 8, 128, [(1, 4096), (1, 65536), (8, 16384), (32, 4096), (64, 8192), (128, 2048), (256, 1024)],
                   (16, 64)),
          "quick": (32, 8, 128, [(1, 256), (2, 128)], (16, 64))}
COPY_BYTES = {"full": 1 << 30, "quick": 1 << 24}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", default="all",
                        help="comma-separated benchmarks to run, among prefill, varlen, append, decode (default: all)")
    parser.add_argument("--dtypes", default="bf16",
                        help=f"comma-separated dtypes, each section runs once per dtype, among {', '.join(DTYPES)} "
                             f"(default: bf16)")
    parser.add_argument("--backends", default="flash,cudnn,efficient,default,flex",
                        help="comma-separated anchors to time beside hf_flash, among flash, cudnn, efficient, default "
                             "(SDPA's own choice; decode only) and flex (default: all)")
    parser.add_argument("--seqlens", help="comma-separated prefill sequence lengths: only the prefill rows of these "
                                          "(default: every row)")
    parser.add_argument("--out", help="write the results as JSON to this file (rewritten after every row)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script (e.g. on a CPU)")
    args = parser.parse_args(argv)
    args.section = list(ANCHORS) if args.section == "all" else args.section.split(",")
    args.dtypes = args.dtypes.split(",")
    args.backends = args.backends.split(",") if args.backends else []
    for flag, given, known in (("sections", args.section, ANCHORS), ("dtypes", args.dtypes, DTYPES),
                               ("backends", args.backends, [*SDPA_BACKENDS, "flex"])):
        unknown = set(given) - set(known)
        if unknown or not given:
            parser.error(f"unknown {flag}: {', '.join(sorted(unknown))}" if unknown else f"no {flag} given")
    args.device = torch.device(args.device)
    args.size = "quick" if args.quick else "full"
    try:
        args.seqlens = {int(n) for n in args.seqlens.split(",")} if args.seqlens else None
    except ValueError:
        parser.error(f"--seqlens takes comma-separated integers, got {args.seqlens!r}")
    rows = {s for *_, seqlens in PREFILL[args.size][1] for s in seqlens}
    if args.seqlens is not None and not args.seqlens <= rows:
        parser.error(f"--seqlens {','.join(map(str, sorted(args.seqlens - rows)))}: no prefill row has it "
                     f"(rows: {','.join(map(str, sorted(rows)))})")
    return args


def sdpa(backend, q, k, v, **kwargs):
    """``F.scaled_dot_product_attention`` restricted to one SDPA backend (None: no restriction)."""
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def reference(q, k, v, **kwargs):
    """SDPA with PyTorch's choice of backend and its warnings silenced: the output ours is compared with."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sdpa(None, q, k, v, **kwargs)


def is_ours(name):
    return name.startswith("ours")


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
            if is_ours(name):  # ours must run everywhere: say at once, not in the notes
                say(f"hf_flash ({name}) failed: {message}")
            free_memory(self.device)  # an out-of-memory backend must not starve the next one
            return None, None

    def rate(self, name, fn, work, graph=False):
        """(output, ``work`` per second / 1e12) of ``fn``: TFLOP/s of FLOPs, TB/s of bytes (None where n/a)."""
        out, ms = self.run(name, fn, graph=graph)
        return out, tera_per_s(work, ms)

    def anchor(self, name, fn, q, k, v, graph=False):
        """(median ms, whether K/V were repeated) of an anchor ``fn(q, k, v, ...)`` on [B, H, S, D] tensors: with
        ``enable_gqa=True`` where K/V have fewer heads than q, and where the backend refuses that, on K/V repeated to
        every query head."""
        group = q.shape[1] // k.shape[1]
        if group == 1:
            return self.run(name, functools.partial(fn, q, k, v), graph=graph)[1], False
        _, ms = self.run(name, functools.partial(fn, q, k, v, enable_gqa=True), label=f"{name} with GQA", graph=graph)
        if ms is not None:
            return ms, False
        kr, vr = (t.repeat_interleave(group, dim=1) for t in (k, v))
        _, ms = self.run(name, functools.partial(fn, q, kr, vr), graph=graph)
        return ms, ms is not None

    def finish(self, section, results, anchors):
        """The section's closing notes and recorded errors; False if one of ours failed somewhere."""
        if "flex" in anchors:
            say(f"FlexAttention's first calls (its compiles on CUDA), not timed: "
                f"{self.first_call_s.get('flex', 0.0):.0f} s")
        for name, message in self.errors.items():
            say(f"  {name} n/a: {message}")
        results.set(f"{section}_errors", self.errors)
        return not any(is_ours(name) for name in self.errors)


def max_abs_diff(a, b):
    return None if a is None or b is None else (a.float() - b.float()).abs().max().item()


def worst(diffs):
    """The largest of the differences that were measured (None if none was)."""
    return max((d for d in diffs if d is not None), default=None)


def tera_per_s(work, ms):
    """``work`` (FLOPs, bytes) done in ``ms`` milliseconds, per second / 1e12; None for a backend that is n/a."""
    return None if ms is None else work / (ms * 1e-3) / 1e12


def ratio(a, b):
    return a / b if a and b else None  # None where either backend is n/a


def over(rates, names):
    """Ours over each of ``names``."""
    return {name: ratio(rates["ours"], rates.get(name)) for name in names}


def randn(*shape, args, dtype):
    return torch.randn(*shape, device=args.device, dtype=dtype)


def anchor_fn(name, flex, block_mask, causal):
    """An anchor's call on [B, H, S, D] tensors: FlexAttention with ``block_mask``, or SDPA's backend ``name``."""
    if name == "flex":
        return functools.partial(flex, block_mask=block_mask)
    return functools.partial(sdpa, SDPA_BACKENDS[name], is_causal=causal)


def say_repeated(repeated, what):
    if repeated:
        say(f"* {', '.join(sorted(repeated))} refused GQA (enable_gqa=True) and ran on K/V repeated to every query "
            f"head, {what}")


def bench_prefill(args, results, flex):
    tokens, groups = PREFILL[args.size]
    anchors = [a for a in ANCHORS["prefill"] if a in args.backends]
    runner = Runner(args.device)
    table = Table([("dtype", 5), ("D", 4), ("S", 6), ("B", 3), ("H", 3), ("Hkv", 3), ("causal", 6), ("ours", 6),
                   *[(a, 9) for a in anchors], ("/flash", 6), ("/cudnn", 6), ("host us", 7), ("call us", 7),
                   ("maxdiff", 8)])
    say(f"\nprefill: TFLOP/s, {tokens} tokens per batch (B x S), H / Hkv query / KV heads of head dim D")
    table.header()
    cases = [(dtype, d, h, hkv, s) for dtype in args.dtypes for d, h, hkv, seqlens in groups for s in seqlens
             if args.seqlens is None or s in args.seqlens]
    repeated_kv = set()  # anchors that refused GQA
    for dtype, head_dim, heads, kv_heads, seqlen in progress(cases, desc="prefill"):
        batch = tokens // seqlen
        q = randn(batch, seqlen, heads, head_dim, args=args, dtype=DTYPES[dtype])
        k, v = (randn(batch, seqlen, kv_heads, head_dim, args=args, dtype=DTYPES[dtype]) for _ in range(2))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views, as transformers passes them
        gqa = {"enable_gqa": True} if kv_heads != heads else {}
        for causal in (False, True):
            flops = 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
            tflops = {}
            ours = functools.partial(hf_flash.attention, q, k, v, causal=causal)
            ours_out, tflops["ours"] = runner.rate("ours", ours, flops)
            host = host_us(ours, args.device) if ours_out is not None else None
            mask = None
            if causal and "flex" in anchors:
                mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seqlen, seqlen,
                                         device=args.device)
            repeated_here = []
            for name in anchors:
                ms, repeated = runner.anchor(name, anchor_fn(name, flex, mask, causal), qt, kt, vt)
                tflops[name] = tera_per_s(flops, ms)
                repeated_here += [name] if repeated else []
            repeated_kv.update(repeated_here)
            diff = max_abs_diff(ours_out, reference(qt, kt, vt, is_causal=causal, **gqa).transpose(1, 2))
            ratios = over(tflops, ("flash", "cudnn"))
            table.row(dtype, head_dim, seqlen, batch, heads, kv_heads, "yes" if causal else "no",
                      cell(tflops["ours"], ".0f"),
                      *[cell(tflops[a], ".0f") + ("*" if a in repeated_here else "") for a in anchors],
                      cell(ratios["flash"], ".2f"), cell(ratios["cudnn"], ".2f"), cell(host, ".0f"),
                      cell(tflops["ours"] and flops / tflops["ours"] / 1e6, ".0f"), cell(diff, ".1e"))
            results.add("prefill", {"dtype": dtype, "head_dim": head_dim, "seqlen": seqlen, "batch": batch,
                                    "heads": heads, "kv_heads": kv_heads, "causal": causal, "tflops": tflops,
                                    "ours_over": ratios, "ours_host_us": host, "repeated_kv": repeated_here,
                                    "max_abs_diff": diff})
            del ours_out
        del q, k, v, qt, kt, vt
        free_memory(args.device)
    say("ratios: ours / flash and ours / cudnn TFLOP/s; host us: ours' host time per call, launches queued without "
        "waiting (call us: its measured time; do_bench's memset hides ~100 us of host time, so a row whose host us "
        "nears call us + 100 is host-bound); maxdiff: max |ours - SDPA| over the outputs")
    say_repeated(repeated_kv, "the same FLOPs")
    return runner.finish("prefill", results, anchors)


def ragged_lengths(total, shortest, longest, seed=0):
    """Sequence lengths drawn uniformly from [shortest, longest] with a fixed seed until they fill ``total`` tokens
    (the last one cut to fit)."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(shortest, longest), total - sum(lengths)))
    return lengths


def padded(packed, lengths):
    """Packed ``[total, H, D]`` as ``[B, longest, H, D]``, zeros after each sequence."""
    out = packed.new_zeros(len(lengths), max(lengths), *packed.shape[1:])
    for b, piece in enumerate(packed.split(lengths)):
        out[b, : len(piece)] = piece
    return out


def bench_varlen(args, results, flex):
    total, heads, head_dim, bounds = VARLEN[args.size]
    lengths = ragged_lengths(total, *bounds)
    anchors = [a for a in ANCHORS["varlen"] if a in args.backends]
    runner = Runner(args.device)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=args.device)
    longest = max(lengths)
    masks = {False: None, True: None}  # FlexAttention's document masks, one per causal
    if "flex" in anchors:
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=args.device),
                                      torch.tensor(lengths, device=args.device))
        mask_mods = {False: lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx],
                     True: lambda b, h, q_idx, kv_idx: (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)}
        masks = {causal: create_block_mask(mod, None, None, total, total, device=args.device)
                 for causal, mod in mask_mods.items()}
    table = Table([("dtype", 5), ("causal", 6), ("ours", 6), ("padded", 6), *[(a, 9) for a in anchors],
                   ("/flash", 6), ("/cudnn", 6), ("maxdiff", 8)])
    say(f"\nvarlen: TFLOP/s, {len(lengths)} sequences of {min(lengths)}..{longest} tokens packed into {total} "
        f"(lengths {lengths}), {heads} heads of {head_dim}")
    table.header()
    for dtype in progress(args.dtypes, desc="varlen"):
        q, k, v = (randn(total, heads, head_dim, args=args, dtype=DTYPES[dtype]) for _ in range(3))
        qkv_padded = [padded(t, lengths) for t in (q, k, v)]
        nested = [torch.nested.nested_tensor_from_jagged(t, cu.long(), min_seqlen=min(lengths), max_seqlen=longest)
                  .transpose(1, 2) for t in (q, k, v)]  # [B, H, jagged S, D]
        flat = [t[None].transpose(1, 2) for t in (q, k, v)]  # [1, H, total, D]: one packed sequence, for Flex
        for causal in (False, True):
            flops = sum(4 * heads * n**2 * head_dim for n in lengths) / (2 if causal else 1)
            tflops = {}
            ours_out, tflops["ours"] = runner.rate("ours", functools.partial(
                hf_flash.attention_varlen, q, k, v, cu, cu, longest, longest, causal=causal), flops)
            tflops["ours_padded"] = runner.rate("ours_padded", functools.partial(hf_flash.attention, *qkv_padded,
                                                                                 causal=causal), flops)[1]
            for name in anchors:
                inputs = flat if name == "flex" else nested
                ms, _ = runner.anchor(name, anchor_fn(name, flex, masks[causal], causal), *inputs)
                tflops[name] = tera_per_s(flops, ms)
            expected = torch.cat([reference(*(t.transpose(0, 1) for t in seq), is_causal=causal).transpose(0, 1)
                                  for seq in zip(*(t.split(lengths) for t in (q, k, v)))])
            diff = max_abs_diff(ours_out, expected)
            ratios = over(tflops, ("flash", "cudnn"))
            table.row(dtype, "yes" if causal else "no", cell(tflops["ours"], ".0f"),
                      cell(tflops["ours_padded"], ".0f"), *[cell(tflops[a], ".0f") for a in anchors],
                      cell(ratios["flash"], ".2f"), cell(ratios["cudnn"], ".2f"), cell(diff, ".1e"))
            results.add("varlen", {"dtype": dtype, "lengths": lengths, "tokens": total, "heads": heads,
                                   "head_dim": head_dim, "causal": causal, "tflops": tflops, "ours_over": ratios,
                                   "max_abs_diff": diff})
            del ours_out, expected
        del q, k, v, qkv_padded, nested, flat
        free_memory(args.device)
    say("FLOPs: the sequences' own (padding none); padded: hf_flash.attention on the batch padded to the longest "
        "sequence; SDPA backends: nested (jagged) tensors; flex: the packed batch with a document mask")
    say("ratios: ours / flash and ours / cudnn TFLOP/s; maxdiff: max |ours - SDPA on each sequence|")
    return runner.finish("varlen", results, anchors)


def scatter_pages(tensors, page_size):
    """Page pools holding ``tensors`` (``[B, L, Hkv, D]`` each, L a multiple of ``page_size``) in pages scattered
    over the pool in random order, as after many sequences came and went; and their block table."""
    batch, seqlen = tensors[0].shape[:2]
    pages = seqlen // page_size
    block_table = torch.randperm(batch * pages, device=tensors[0].device).to(torch.int32).view(batch, pages)
    pools = []
    for t in tensors:
        pool = t.new_empty(batch * pages, page_size, *t.shape[2:])
        pool[block_table.flatten().long()] = t.reshape(batch * pages, page_size, *t.shape[2:])
        pools.append(pool)
    return block_table, pools


def bench_append(args, results, flex):
    heads, kv_heads, head_dim, shapes, page_sizes = APPEND[args.size]
    group = heads // kv_heads
    runner = Runner(args.device)
    table = Table([("dtype", 5), ("B", 3), ("L", 6), ("N", 5), ("dense", 6),
                   *[c for p in page_sizes for c in ((f"p{p}", 6), ("/dense", 6))], ("+write", 6), ("/dense", 6),
                   ("maxdiff", 8)])
    say(f"\nappend: TFLOP/s of N new tokens per sequence over L cached ones and themselves (causal, bottom-right), "
        f"GQA {heads}/{kv_heads} heads of {head_dim}; /dense: over hf_flash.attention on contiguous K/V")
    table.header()
    cases = [(dtype, *shape) for dtype in args.dtypes for shape in shapes]
    for dtype, batch, cached, new in progress(cases, desc="append"):
        q = randn(batch, new, heads, head_dim, args=args, dtype=DTYPES[dtype])
        k, v = (randn(batch, cached + new, kv_heads, head_dim, args=args, dtype=DTYPES[dtype]) for _ in range(2))
        flops = 4 * batch * heads * head_dim * (new * cached + new**2 / 2)
        outs, tflops = {}, {}
        outs["ours_dense"], tflops["ours_dense"] = runner.rate(
            "ours_dense", functools.partial(hf_flash.attention, q, k, v, causal=True), flops)
        # (name, page size, new K/V): the cache holds all L + N tokens, or (+write) L, the call writing the N new ones
        variants = [*((f"ours_p{p}", p, {}) for p in page_sizes),
                    ("ours_write", page_sizes[0], {"k": k[:, cached:].contiguous(), "v": v[:, cached:].contiguous()})]
        names = [name for name, _, _ in variants]
        for name, page_size, new_kv in variants:
            block_table, (k_pool, v_pool) = scatter_pages((k, v), page_size)
            in_cache = torch.full((batch,), cached if new_kv else cached + new, dtype=torch.int32, device=args.device)
            outs[name], tflops[name] = runner.rate(name, functools.partial(
                hf_flash.attention_with_kvcache, q, k_pool, v_pool, in_cache, block_table, **new_kv, causal=True,
                max_seqlen_k=cached + new), flops)
            del k_pool, v_pool
        ratios = {name: ratio(tflops[name], tflops["ours_dense"]) for name in names}
        kr, vr = (t.transpose(1, 2).repeat_interleave(group, dim=1) for t in (k, v))
        expected = reference(q.transpose(1, 2), kr, vr, attn_mask=causal_lower_right(new, cached + new)).transpose(1, 2)
        diff = worst(max_abs_diff(out, expected) for out in outs.values())
        table.row(dtype, batch, cached, new, cell(tflops["ours_dense"], ".0f"),
                  *[c for name in names for c in (cell(tflops[name], ".0f"), cell(ratios[name], ".2f"))],
                  cell(diff, ".1e"))
        results.add("append", {"dtype": dtype, "batch": batch, "cached": cached, "new": new, "heads": heads,
                               "kv_heads": kv_heads, "head_dim": head_dim, "tflops": tflops,
                               "over_dense": ratios, "max_abs_diff": diff})
        del q, k, v, kr, vr, outs, expected, variants
        free_memory(args.device)
    say(f"p16/p64: pages of that size, the cache holding all L + N tokens; +write: the call also writes the N new "
        f"tokens' K/V into pages of {page_sizes[0]} (flash-attn's append); /dense: TFLOP/s over dense's; maxdiff: "
        f"max |hf_flash - SDPA (bottom-right causal mask)| over every hf_flash column")
    return runner.finish("append", results, ())


def bench_decode(args, results, flex):
    heads, kv_heads, head_dim, shapes, page_sizes = DECODE[args.size]
    group = heads // kv_heads
    anchors = [a for a in ANCHORS["decode"] if a in args.backends]
    runner = Runner(args.device)
    copy_tbps = copy_bandwidth(args.device, COPY_BYTES[args.size])
    results.set("copy_tbps", copy_tbps)
    say(f"\ndecode: TB/s of K+V read, GQA {heads}/{kv_heads} heads, head dim {head_dim}; "
        f"device-to-device copy {copy_tbps:.2f} TB/s (read + write)")
    table = Table([("dtype", 5), ("B", 4), ("L", 6), ("splits", 6),
                   *[c for p in page_sizes for c in ((f"ours p{p}", 8), ("%copy", 5))],
                   *[(a, 9) for a in anchors], ("maxdiff", 8)])
    table.header()
    repeated_kv = set()  # anchors that refused GQA and ran on K/V repeated to all query heads
    cases = [(dtype, *shape) for dtype in args.dtypes for shape in shapes]
    for dtype, batch, seqlen in progress(cases, desc="decode"):
        q = randn(batch, 1, heads, head_dim, args=args, dtype=DTYPES[dtype])
        k, v = (randn(batch, kv_heads, seqlen, head_dim, args=args, dtype=DTYPES[dtype]) for _ in range(2))
        qt = q.transpose(1, 2)  # [B, Hq, 1, D]
        nbytes = 2 * k.numel() * k.element_size()
        expected = reference(qt, k, v, enable_gqa=True).transpose(1, 2)
        # What num_splits=0 picks below.
        splits = choose_num_splits(batch, kv_heads, seqlen, args.device, head_dim=head_dim, dtype=DTYPES[dtype])
        tbps, diffs = {}, []
        for page_size in page_sizes:
            block_table, (k_pool, v_pool) = scatter_pages([t.transpose(1, 2) for t in (k, v)], page_size)
            seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=args.device)
            out, tbps[f"ours_p{page_size}"] = runner.rate(
                f"ours_p{page_size}", functools.partial(hf_flash.attention_with_kvcache, q, k_pool, v_pool, seqlens,
                                                        block_table, max_seqlen_k=seqlen), nbytes, graph=True)
            diffs.append(max_abs_diff(out, expected))
            del k_pool, v_pool, out
            free_memory(args.device)
        repeated_here = []
        for name in anchors:
            run = flex if name == "flex" else functools.partial(sdpa, SDPA_BACKENDS[name])
            ms, repeated = runner.anchor(name, run, qt, k, v, graph=True)
            tbps[name] = tera_per_s(nbytes, ms)
            repeated_here += [name] if repeated else []
        repeated_kv.update(repeated_here)
        pct = {p: None if tbps[f"ours_p{p}"] is None else 100 * tbps[f"ours_p{p}"] / copy_tbps for p in page_sizes}
        diff = worst(diffs)
        table.row(dtype, batch, seqlen, splits,
                  *[c for p in page_sizes for c in (cell(tbps[f"ours_p{p}"], ".2f"), cell(pct[p], ".0f"))],
                  *[cell(tbps[a], ".2f") + ("*" if a in repeated_here else "") for a in anchors], cell(diff, ".1e"))
        results.add("decode", {"dtype": dtype, "batch": batch, "seqlen": seqlen, "heads": heads, "kv_heads": kv_heads,
                               "head_dim": head_dim, "num_splits": splits, "kv_bytes": nbytes, "tbps": tbps,
                               "ours_pct_of_copy": pct, "repeated_kv": repeated_here, "max_abs_diff": diff})
        del q, k, v, qt, expected
        free_memory(args.device)
    say("Decode times are CUDA-graph replays for every backend (launch overhead excluded alike).")
    say("TB/s: K+V bytes the sequence lengths cover over the median time (q and out add at most 0.2%); splits: "
        "split-KV factor hf_flash chose; ours p16/p64: page size; %copy: ours over the copy bandwidth; maxdiff: "
        "max |ours - SDPA| over both page sizes")
    say_repeated(repeated_kv, f"reading {group}x the bytes; its TB/s still counts the {kv_heads}-head K/V, like the "
                              f"others'")
    return runner.finish("decode", results, anchors)


SECTIONS = {"prefill": bench_prefill, "varlen": bench_varlen, "append": bench_append, "decode": bench_decode}


def main(argv=None):
    args = parse_args(argv)
    start, results = begin(args)
    # One compiled FlexAttention for every shape. Static shapes (dynamic=False) give each shape, mask and dtype its
    # own kernel, as a model with a fixed length would get; that is far more graphs than dynamo's default limits
    # (past them it would run FlexAttention uncompiled, unfused).
    # On a CPU (a check of the script, no number to report) FlexAttention runs eager: its compiles there would take
    # minutes.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 1024
    flex = torch.compile(flex_attention, dynamic=False) if args.device.type == "cuda" else flex_attention
    # SDPA on nested tensors logs why each backend refuses at warning level, many lines a call: the first error of
    # each backend is in the notes.
    logging.getLogger("torch.nested._internal.sdpa").setLevel(logging.ERROR)
    torch.manual_seed(0)  # the same inputs in every run (and the same ragged lengths: those have their own seed)
    ok = True
    for name in SECTIONS:
        if name in args.section:
            ok &= SECTIONS[name](args, results, flex)
    results.set("elapsed_s", time.perf_counter() - start)
    say(f"\ndone in {time.perf_counter() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    return 0 if ok else 1  # hf_flash failing on some shape fails the run; anchors may be n/a


if __name__ == "__main__":
    sys.exit(main())

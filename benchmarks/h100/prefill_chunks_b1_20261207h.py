"""Batch-one prompts prefilled whole (shipped: ``TWO_CHUNKS_FROM`` = 2048 tokens) against in two chunks from 512
tokens: time to first token, decode rate and peak memory beside sdpa, one process, the same model; then where a
two-chunk prefill's host time goes (torch.profiler, CPU side, one warm ``max_new_tokens=1`` call).

The question: the 12-03 measurement had the second chunk add 29 ms to a 21 ms prefill (1B, 1 x 512), which kept
batch-one prompts whole and their peak 4.7 MB over sdpa's. Run on the device from /tmp (not the repo root):
    PYTHONPATH=/tmp/site python3 $REPO/benchmarks/h100/prefill_chunks_b1_20261207h.py $REPO $OUT
"""
import sys

repo, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, f"{repo}/scripts")

import time  # noqa: E402

import torch  # noqa: E402

import bench_generate  # noqa: E402
import hf_flash.patches.generate as patched  # noqa: E402

for two_chunks_from in (2048, 512):
    patched.TWO_CHUNKS_FROM = two_chunks_from
    print(f"\n=== TWO_CHUNKS_FROM = {two_chunks_from}", flush=True)
    bench_generate.main(["--rows", "1b:1x512x128", "--skip", "static", "--repeats", "5",
                         "--out", f"{out}/prefill_chunks_b1_{two_chunks_from}.json"])

# Where the two-chunk prefill's time goes (host side): one warm prefill-only call, profiled.
from torch.profiler import ProfilerActivity, profile  # noqa: E402

patched.TWO_CHUNKS_FROM = 512
device = torch.device("cuda")
model = bench_generate.build_model("1b", device)
model.set_attn_implementation("hf_flash")
ids = torch.randint(1, model.config.vocab_size, (1, 512), device=device)
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
forwards = []
original_forward = model.forward


def timed_forward(*args, **kwargs):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = original_forward(*args, **kwargs)
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    forwards.append((kwargs.get("input_ids", args[0] if args else None).shape[-1], host, time.perf_counter() - start))
    return result


for _ in range(3):
    bench_generate.generate(model, inputs, "hf_flash", 1, device)
model.forward = timed_forward
forwards.clear()
for _ in range(3):
    seconds, _, _ = bench_generate.generate(model, inputs, "hf_flash", 1, device)
    print(f"prefill-only call {seconds * 1e3:.1f} ms; forwards (tokens, host ms, synced ms): "
          f"{[(n, round(h * 1e3, 1), round(s * 1e3, 1)) for n, h, s in forwards]}", flush=True)
    forwards.clear()
model.forward = original_forward
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    bench_generate.generate(model, inputs, "hf_flash", 1, device)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), flush=True)
prof.export_chrome_trace(f"{out}/prefill_chunks_b1_trace.json")

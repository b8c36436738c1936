"""Charts of benchmark results: PNGs drawn from the JSON that ``bench_kernels.py`` and ``bench_generate.py`` write
with ``--out``, for the sections the given files hold:
    prefill.png    TFLOP/s against sequence length, one panel per dtype, head dim, GQA or not, and masking
    varlen.png     TFLOP/s of ragged batches packed without padding, beside the same batch padded and SDPA's nested
                   tensors, per dtype and masking
    append.png     TFLOP/s of paged prefill (new tokens over a paged cache), pages of 16 and 64, beside the same
                   kernel over contiguous K/V
    decode.png     TB/s of K+V read per (batch, context length; dtype where several, and the split count hf_flash
                   chose), beside the copy bandwidth of the same run
    generate.png   decode as a share of the memory roofline (or, in results without one, end-to-end tokens/s) and
                   peak GPU memory per model and shape
Each chart is titled with the device, versions and date of its run.
    python scripts/plot_benchmarks.py bench_kernels.json bench_generate.json --out-dir plots
"""
import argparse
import itertools
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt
from bench_common import describe

GIB = 2**30
# (label, color): one color per backend in every chart; hf_flash in the warm colors.
STYLE = {"ours": ("hf_flash", "C3"), "ours_p16": ("hf_flash page 16", "C3"), "ours_p64": ("hf_flash page 64", "C1"),
         "ours_dense": ("hf_flash contiguous", "C5"), "ours_write": ("hf_flash page 16 + writing the new K/V", "C6"),
         "ours_padded": ("hf_flash padded", "C1"),
         "flash": ("SDPA flash", "C0"), "cudnn": ("SDPA cuDNN", "C2"), "efficient": ("SDPA efficient", "C4"),
         "default": ("SDPA default", "C7"), "flex": ("FlexAttention", "C9"), "sdpa": ("sdpa + DynamicCache", "C0"),
         "hf_flash": ("hf_flash + PagedCache", "C3"), "static": ("sdpa + static (compiled)", "C2")}


def style(name):
    """Label and color of a backend; an unknown one keeps its name and the next default color."""
    text, color = STYLE.get(name, (name, None))
    return {"label": text, "color": color}


def is_ours(name):
    return name.startswith(("ours", "hf_flash"))


def bars(ax, groups, series, values, ylabel):
    """Grouped bars: one group per entry of ``groups``, one bar per series; ``values[series][group]`` may be None
    (a backend that did not run there), which leaves a gap; a series that never ran is left out."""
    series = [name for name in series if any(v is not None for v in values[name])]
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [values[name][g] for g in range(len(groups))]
        ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
               edgecolor="black" if is_ours(name) else "none", linewidth=1.2, **style(name))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if not series:
        ax.text(0.5, 0.5, "not measured on this device", transform=ax.transAxes, ha="center", color="gray")


def dtype_of(record):
    return record.get("dtype", "bf16")  # results from before --dtypes are bf16


def plot_prefill(records):
    """One panel per (dtype, masking) row and (head dim, GQA or not) column; results from before GQA rows have
    only MHA (no ``kv_heads``)."""
    def panel_of(r):
        return (dtype_of(r), r["causal"]), (r["head_dim"], r.get("kv_heads", r["heads"]) != r["heads"])

    rows, columns = (sorted({panel_of(r)[i] for r in records}) for i in (0, 1))
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(4.2 * len(columns), 3.8 * len(rows)), squeeze=False,
                             sharey=True)
    for (i, (dtype, causal)), (j, (head_dim, gqa)) in itertools.product(enumerate(rows), enumerate(columns)):
        ax = axes[i][j]
        panel = sorted((r for r in records if panel_of(r) == ((dtype, causal), (head_dim, gqa))),
                       key=lambda r: r["seqlen"])
        if not panel:
            ax.set_visible(False)
            continue
        for name in panel[0]["tflops"]:
            points = [(r["seqlen"], r["tflops"][name]) for r in panel if r["tflops"].get(name) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", linewidth=2.5 if is_ours(name) else 1.2, **style(name))
        ax.set_xscale("log", base=2)
        lengths = [r["seqlen"] for r in panel]
        ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.minorticks_off()
        heads = f", GQA {panel[0]['heads']}/{panel[0]['kv_heads']}" if gqa else ""
        ax.set_title(f"{dtype}, head dim {head_dim}{heads}, {'causal' if causal else 'no mask'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s" if j == 0 else "")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    return fig


def plot_grouped(records, groups, title):
    """TFLOP/s bars, one group per record (labelled by ``groups``), one bar per backend of the records."""
    series = list(dict.fromkeys(name for r in records for name in r["tflops"]))
    values = {name: [r["tflops"].get(name) for r in records] for name in series}
    fig, ax = plt.subplots(figsize=(max(8.0, 1.8 * len(groups)), 4.6))
    bars(ax, groups, series, values, "TFLOP/s")
    highest = max((v for name in series for v in values[name] if v is not None), default=None)
    if highest:
        ax.set_ylim(top=1.3 * highest)  # room for the legend above the bars
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    return fig


def plot_varlen(records):
    r = records[0]
    groups = [f"{dtype_of(r)}\n{'causal' if r['causal'] else 'no mask'}" for r in records]
    return plot_grouped(records, groups, f"varlen: {len(r['lengths'])} sequences of {min(r['lengths'])}.."
                        f"{max(r['lengths'])} tokens, {r['heads']} heads of {r['head_dim']}")


def plot_append(records):
    r = records[0]
    groups = [f"{dtype_of(r)}\nB={r['batch']}\nL={r['cached']}\nN={r['new']}" for r in records]
    return plot_grouped(records, groups, f"paged append: N new tokens over L cached, causal, GQA "
                        f"{r['heads']}/{r['kv_heads']}, head dim {r['head_dim']}")


def plot_decode(records, copy_tbps=None):
    dtypes = list(dict.fromkeys(map(dtype_of, records)))
    # dtype where the results hold several; the split count hf_flash chose where recorded
    groups = [f"B={r['batch']}\nL={r['seqlen']}" + (f"\n{dtype_of(r)}" if len(dtypes) > 1 else "")
              + (f"\nsplits {r['num_splits']}" if "num_splits" in r else "") for r in records]
    series = list(records[0]["tbps"])
    values = {name: [r["tbps"].get(name) for r in records] for name in series}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.2))
    bars(ax, groups, series, values, "TB/s of K+V read")
    if copy_tbps:
        ax.axhline(copy_tbps, color="gray", linestyle="--", linewidth=1)
        ax.text(-0.45, copy_tbps, f"device copy {copy_tbps:.2f} TB/s", ha="left", va="bottom", fontsize=8)
    r = records[0]
    ax.set_title(f"paged decode, {', '.join(dtypes)}, GQA {r['heads']}/{r['kv_heads']}, head dim {r['head_dim']}")
    ax.legend(fontsize=8, ncol=2)
    return fig


def plot_generate(records):
    records = [r for r in records if "error" not in r]
    groups = list(dict.fromkeys(f"{r['model']} {r['batch']}x{r['prompt']}x{r['new_tokens']}" for r in records))
    series = list(dict.fromkeys(r["impl"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 3.0 * len(groups)), 4.2))
    # Results with a measured roofline (bench_generate.py since it measures one) show decode speed as its share.
    with_roofline = any(r.get("roofline_fraction") is not None for r in records)
    speed = (("roofline_fraction", "decode, % of the memory roofline", 100) if with_roofline
             else ("e2e_tok_s", "end-to-end tokens/s", 1))
    for ax, key, ylabel, scale in ((axes[0], *speed),
                                   (axes[1], "peak_bytes", "peak GPU memory, GiB", 1 / GIB)):
        values = {name: [None] * len(groups) for name in series}
        for r in records:
            if r.get(key) is not None:
                values[r["impl"]][groups.index(f"{r['model']} {r['batch']}x{r['prompt']}x{r['new_tokens']}")] = \
                    r[key] * scale
        bars(ax, groups, series, values, ylabel)
        ax.set_xlabel("model, batch x prompt x new tokens")
    axes[0].legend(fontsize=8)
    axes[0].set_title("generate(), greedy")
    return fig


PLOTS = {"prefill": plot_prefill, "varlen": plot_varlen, "append": plot_append, "decode": plot_decode,
         "generate": plot_generate}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by bench_kernels.py / bench_generate.py --out")
    parser.add_argument("--out-dir", default="plots", help="where the PNGs go (default: plots)")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    # A section may come in several files (e.g. bench_generate.py run once per model): their rows go on one chart,
    # titled with the first file's run.
    sections = {}
    for results_path in args.results:
        with open(results_path) as f:
            data = json.load(f)
        for section in PLOTS:
            if data.get(section):
                found = sections.setdefault(section, {"records": [], "environment": data["environment"],
                                                      "copy_tbps": data.get("copy_tbps")})
                found["records"] += data[section]
    written = []
    for section, plot in PLOTS.items():
        if section not in sections:
            continue
        found = sections[section]
        extra = {"copy_tbps": found["copy_tbps"]} if section == "decode" else {}
        path = os.path.join(args.out_dir, f"{section}.png")
        fig = plot(found["records"], **extra)
        fig.suptitle(describe(found["environment"]), fontsize=8, y=0.995)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if not written:
        print(f"no {', '.join(PLOTS)} results in {', '.join(args.results)}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What scripts/bench_kernels.py and scripts/bench_generate.py share: timing, tables printed row by row, JSON results
rewritten after every row (a run cut short still leaves its numbers), and the environment they ran in."""
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

import hf_flash


def progress(iterable, **kwargs):
    """tqdm bars on a terminal only: piped logs of GPU runs keep just the table rows, which show progress too."""
    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **kwargs)


def say(text=""):
    """Print without breaking a progress bar."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    """Return the last shape's tensors to the device, so no shape's numbers depend on the ones before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_ms(fn, device):
    """Median milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (warm-up 25 ms, 100 ms of runs). It zeroes a 256 MB buffer before every run, so
    inputs come from HBM rather than L2, and that memset (~0.1 ms of GPU time) lets the host queue ``fn``'s launches
    ahead: Python launch overhead shorter than it is not counted. Elsewhere: wall clock over a few runs (only to
    check the scripts, no number to report).
    """
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def copy_bandwidth(device, nbytes):
    """Device-to-device copy bandwidth of ``nbytes``, TB/s, counting bytes read and written: the memory roofline."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    tbps = 2 * src.numel() / (bench_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e12
    del src, dst
    free_memory(device)
    return tbps


def host_us(fn, device, calls=20, rounds=3):
    """Host microseconds per call of ``fn``: its launches queued back to back, the GPU not waited on until the end of
    a round; the best of ``rounds`` (a single round of 20 read 1.2-2.5x the steady host time on an H100, 2026-12-06).
    Where it nears a call's measured time the call is host-bound (``bench_ms``'s memset hides ~0.1 ms of it). None
    off CUDA."""
    if device.type != "cuda":
        return None
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    synchronize(device)
    return 1e6 * best / calls


def bench_graph_ms(fn, device):
    """Median milliseconds of replaying ``fn`` captured in a CUDA graph: the GPU time of its kernels without the
    host's launch overhead, which would otherwise dominate microsecond-scale decode kernels (both ours and the
    anchors are timed this way). Falls back to ``bench_ms`` where capture fails."""
    if device.type != "cuda":
        return bench_ms(fn, device)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream, as torch.cuda.graphs requires
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001  (host syncs, compiled callables that refuse capture, ...)
        return bench_ms(fn, device)
    return bench_ms(graph.replay, device)


def cell(value, spec=".1f"):
    """A table cell: ``value`` formatted, or "n/a" for a backend that did not run."""
    return "n/a" if value is None else format(value, spec)


class Table:
    """Fixed-width columns, printed a row at a time as results arrive."""

    def __init__(self, columns):
        self.columns = columns  # [(title, width)]

    def header(self):
        say("  ".join(f"{title:>{width}}" for title, width in self.columns))

    def row(self, *cells):
        say("  ".join(f"{c!s:>{width}}" for c, (_, width) in zip(cells, self.columns)))


def environment(device):
    """Device, versions and command line, stored with the results."""
    import transformers

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "hf_flash": hf_flash.__version__,
            "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # no Triton wheel for this platform: hf_flash runs its torch path
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return info


def describe(info):
    """One line about where the numbers come from."""
    where = f"{info['gpu']} ({info['sms']} SMs, {info['gpu_memory_gib']} GiB)" if info["gpu"] else info["cpu"]
    return (f"{where}; torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
            f"hf_flash {info['hf_flash']}; {info['date_utc']}")


class Results:
    """Results by section, written to ``path`` (if given) after every ``add``."""

    def __init__(self, path, info):
        self.path = path
        self.data = {"environment": info}
        if path is not None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def set(self, key, value):
        self.data[key] = value
        self._write()

    def add(self, section, record):
        self.data.setdefault(section, []).append(record)
        self._write()

    def _write(self):
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)  # a reader never sees half a file


def begin(args):
    """What every benchmark starts with: its clock, the results file (``args.out``) and a line on the machine."""
    info = environment(args.device)
    say(describe(info))
    return time.perf_counter(), Results(args.out, info)

"""(Run on 2026-12-06 evening, with hf_flash.kernels.launch; Triton 3.6 internals, for diagnosis only.)

Where the Gluon prefill's Triton launch spends its ~55 us of host time (D128 H16 causal bf16, B16 S1k): each step
of ``JITFunction.run`` and of the CUDA launcher called apart on the captured arguments, best of 3 x 400 calls, no
sync."""
import pathlib
import sys

import torch
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import compute_cache_key

import hf_flash
from hf_flash import kernels
from hf_flash.kernels import prefill_sm90 as ps

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
import bench_common  # noqa: E402

dev = torch.device("cuda")
print(torch.cuda.get_device_name(dev), torch.__version__, triton.__version__, flush=True)


def host_us(fn):
    for _ in range(10):
        fn()
    return bench_common.host_us(fn, dev, calls=400)


@triton.jit
def _wide(a0, a1, a2, a3, a4, a5, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, f0, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(a0 + offs, tl.load(a1 + offs) + i0 + i1 + i2 + i3 + i4 + i5 + i6 + i7 + i8 + i9 + i10 + i11 + i12 + i13 + f0)


b, s, h, d = 16, 1024, 16, 128
q = torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
out, lse = torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)
zeros = torch.zeros(b, dtype=torch.int32, device=dev)
lens = torch.full_like(zeros, s)
scale = d ** -0.5


def sm90():
    ps.prefill_sm90(q, k, v, out, lse, zeros, lens, zeros, lens, s, softmax_scale=scale, causal=True)


config = ps.SM90_CONFIGS[d, s >= ps.SM90_LONG_SEQLEN]
kernel = ps._prefill_sm90_ws_kernel if config.warp_specialized else ps._prefill_sm90_kernel
captured = {}
original_run = kernel.run


def recording_run(*args, grid, warmup, **kwargs):
    captured.update(args=args, grid=grid, kwargs=dict(kwargs))
    result = original_run(*args, grid=grid, warmup=warmup, **kwargs)
    captured["compiled"] = result
    return result


kernel.run = recording_run
kernels._COMPILED.clear()
sm90()
torch.cuda.synchronize()
kernel.run = original_run
args, grid, kwargs, compiled = captured["args"], captured["grid"], captured["kwargs"], captured["compiled"]
print("grid", grid, "kwargs", sorted(kwargs), "args", len(args), flush=True)

device = driver.active.get_current_device()
stream = driver.active.get_current_stream(device)
kernel_cache, kernel_key_cache, target, backend, binder = kernel.device_caches[device]
bind_kwargs = dict(kwargs, debug=kernel.debug or knobs.runtime.debug,
                   instrumentation_mode=knobs.compilation.instrumentation_mode)
bound_args, specialization, options = binder(*args, **bind_kwargs)
key = compute_cache_key(kernel_key_cache, specialization, options)
assert kernel_cache[key] is compiled
values = list(bound_args.values())
print("specialization", specialization, flush=True)
print("options", options, flush=True)
launcher = compiled.run
meta = getattr(compiled.metadata, "tensordesc_meta", None)
from triton.backends.nvidia.driver import make_tensordesc_arg  # noqa: E402

raw_launch = next(c.cell_contents for c in launcher.launch.__closure__ if callable(c.cell_contents)
                  and getattr(c.cell_contents, "__name__", "") == "launch")
descs = [i for i, val in enumerate(values) if isinstance(val, ps.TensorDescriptor)]


def final_args():
    final = []
    for i, val in enumerate(values):
        if i in descs:
            final.extend(make_tensordesc_arg(val, meta[descs.index(i)] if meta else None))
        else:
            final.append(val)
    return final


prepared = final_args()
grid3 = (grid[0], 1, 1)


def used_globals():
    missing = object()
    for (name, _), (val, globals_dict) in kernel.used_global_vals.items():
        if globals_dict.get(name, missing) != val:
            raise RuntimeError(name)


def conservative_key():  # what a launch cache keyed on specialization classes would compute
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                 else (a == 1, a % 16 == 0, -2**31 <= a < 2**31) if type(a) is int else type(a) for a in args)


x = torch.zeros(64, device=dev)
y = torch.zeros(64, device=dev)
rows = {
    "prefill_sm90 (whole launcher)": sm90,
    "kernel[grid](...) on captured args": lambda: kernel[grid](*args, **kwargs),
    "binder": lambda: binder(*args, **bind_kwargs),
    "compute_cache_key": lambda: compute_cache_key(kernel_key_cache, specialization, options),
    "used_global_vals check": used_globals,
    "get_current_device + stream": lambda: driver.active.get_current_stream(driver.active.get_current_device()),
    "launch_metadata": lambda: compiled.launch_metadata(grid, stream, *values),
    "compiled.run (launcher, descs encoded)": lambda: launcher(grid[0], 1, 1, stream, compiled.function,
                                                               compiled.packed_metadata, None, None, None, *values),
    "compiled[grid](*values) runner": lambda: compiled[grid3](*values),
    "make_tensordesc_arg x3": final_args,
    "raw C launch (prepared args)": lambda: raw_launch(grid[0], 1, 1, stream, compiled.function,
                                                       launcher.launch_cooperative_grid, launcher.launch_pdl, None,
                                                       None, *prepared),
    "3 TensorDescriptors": lambda: [ps.TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 128, 1, 128],
                                                        ps.box_layout(128, 128, ps.gl.bfloat16)) for t in (q, k, v)],
    "conservative key (python)": conservative_key,
    "wide triton launch (21 args)": lambda: _wide[(1,)](x, y, x, y, x, y, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                       14, 0.5, BLOCK=64),
}
for name, fn in rows.items():
    try:
        print(f"{name:40s} {host_us(fn):7.1f}", flush=True)
    except Exception as error:  # diagnosis: say what failed and go on
        print(f"{name:40s} failed: {type(error).__name__}: {error}", flush=True)

# The fast path's output equals the JIT path's.
ref = out.clone()
out.fill_(float("nan"))
compiled[grid3](*values)
torch.cuda.synchronize()
print("runner output equal:", torch.equal(out, ref), flush=True)

import cProfile  # noqa: E402
import pstats  # noqa: E402

profile = cProfile.Profile()
profile.enable()
for _ in range(2000):
    sm90()
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile).sort_stats("tottime").print_stats(18)


# A/B in one process: the cached launch (hf_flash.kernels.launch) against the JIT path every call.
qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))


def cudnn():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)


cached_class = kernels._arg_class
for name, fn in (("prefill_sm90", sm90), ("hf_flash.attention", lambda: hf_flash.attention(q, k, v, causal=True)),
                 ("cuDNN SDPA", cudnn)):
    kernels._arg_class = cached_class
    cached = host_us(fn)
    kernels._arg_class = lambda arg: None  # no key: the JIT path
    jit = host_us(fn)
    print(f"A/B host us {name:22s} cached launch {cached:7.1f}  JIT path {jit:7.1f}", flush=True)
kernels._arg_class = cached_class

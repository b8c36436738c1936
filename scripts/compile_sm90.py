"""Compiles the Gluon prefill (``hf_flash/kernels/prefill_sm90.py``) for sm90 without a GPU and prints, per config,
what the compiler reports: fp32 FMAs in the PTX, shared memory, registers and spills (``ptxas -v`` of the PTX, with
the ptxas Triton uses for sm90). A kernel edit or a candidate config can be checked this way before a device run:
spills inside the key loop cost more than the tile gains (BENCHMARKS.md, 2026-12-07). Runs without TRITON_INTERPRET
(the interpreter wraps Gluon kernels). Default: every shipped config once, dense causal and full over the smallest
pages it reads by TMA.

    python scripts/compile_sm90.py
    python scripts/compile_sm90.py --head-dim 64 --config 192,128,3,4,0,1 --causal
"""
import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton

from hf_flash import kernels
from hf_flash.kernels import prefill_sm90


def compile_for_sm90(head_dim, config, causal, page_size):
    """The kernel compiled for sm90 to a cubin, typed as ``prefill_sm90`` launches it on bf16 tensors (TensorDescriptors
    built on the host are plain objects); ``page_size`` 0: dense K/V."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    block_m, block_n = config.block_m, config.block_n
    kernel = prefill_sm90._prefill_sm90_ws_kernel if config.warp_specialized else prefill_sm90._prefill_sm90_kernel
    box = prefill_sm90._box_rows(config, torch.empty(1, page_size or 1), torch.empty(1) if page_size else None)
    t = torch.empty(2, 1024, 8, head_dim, dtype=torch.bfloat16)

    def descriptor(rows, cols):
        layout = prefill_sm90.box_layout(rows, cols, prefill_sm90.gl.bfloat16)
        block = [1, rows, 1, cols]
        return mangle_type(prefill_sm90.TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout))
    constants = dict(CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=config.stages,
                     Q_IN_REGISTERS=config.q_in_registers, PAGE_SIZE=page_size or 1, PAGED=page_size > 0,
                     num_warps=config.num_warps)
    pointers = {"Out": "*bf16", "Lse": "*fp32", "BlockTable": "*i32", "q_start_ptr": "*i32", "q_len_ptr": "*i32",
                "k_start_ptr": "*i32", "k_len_ptr": "*i32"}
    names = kernel.arg_names
    signature = {name: (descriptor(block_m, head_dim) if name == "q_desc"
                        else descriptor(box, head_dim if box == block_n else prefill_sm90.KV_BOX_COLS)
                        if name in ("k_desc", "v_desc")
                        else pointers.get(name) or ("constexpr" if name in constants
                                                    else "fp32" if name == "qk_scale" else "i32"))
                 for name in names}
    source = GluonASTSource(kernel, signature, constants,
                            {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name in pointers})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, **kernels.COMPILE_OPTIONS})


def ptxas_report(ptx):
    """(registers, spill store bytes, spill load bytes) that ptxas reports for ``ptx`` on sm90a (the launch's register
    count: warp-specialized partitions then move theirs with setmaxnreg)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return registers, stores, loads


def report(head_dim, config, causal, page_size):
    kernel = compile_for_sm90(head_dim, config, causal, page_size)
    ptx = kernel.asm["ptx"]
    registers, stores, loads = ptxas_report(ptx)
    fmas = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
    print(f"D{head_dim} {tuple(config)} {'causal' if causal else 'full'} pages {page_size or '-'}: fp32 fma {fmas} "
          f"shared {kernel.metadata.shared} registers {registers} spills {stores} / {loads}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, choices=prefill_sm90.SM90_HEAD_DIMS)
    parser.add_argument("--config", help="block_m,block_n,stages,num_warps,q_in_registers,warp_specialized (0/1)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--page-size", type=int, default=0, help="0: dense K/V (default)")
    args = parser.parse_args()
    if prefill_sm90.GLUON_ERROR is not None:
        parser.error(f"this Triton ({triton.__version__}) has no usable Gluon: {prefill_sm90.GLUON_ERROR}")
    if (args.config is None) != (args.head_dim is None):
        parser.error("--config and --head-dim go together")
    if args.config is None and (args.causal or args.page_size):
        parser.error("--causal and --page-size go with --config (the default run compiles the shipped configs)")
    if args.config is not None:
        fields = args.config.split(",")
        if len(fields) != 6 or not all(field.isdigit() for field in fields):
            parser.error(f"--config takes six comma-separated integers, got {args.config!r}")
        config = prefill_sm90.Sm90Config(*map(int, fields[:4]), *(field != "0" for field in fields[4:]))
        if args.page_size < 0 or (args.page_size and not prefill_sm90._box_rows(
                config, torch.empty(1, args.page_size), torch.empty(1))):
            parser.error(f"--page-size {args.page_size}: this config's kernel does not read such pages by TMA "
                         f"(they must hold whole key tiles of {config.block_n} or split them evenly into at least "
                         f"{prefill_sm90.MIN_BOX_ROWS[config.warp_specialized]} rows)")
        report(args.head_dim, config, args.causal, args.page_size)
        return
    for head_dim, config in sorted({(head_dim, config) for (head_dim, _), config in prefill_sm90.SM90_CONFIGS.items()}):
        report(head_dim, config, True, 0)
        report(head_dim, config, False, prefill_sm90.MIN_BOX_ROWS[config.warp_specialized])


if __name__ == "__main__":
    main()

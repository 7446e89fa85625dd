"""Registers, spills and load widths of every Triton kernel launch of the fused FCDM block (models/kernels) at a
model's shapes, read from the compiler: no GPU and no device time needed.

A kernel that needs more registers than it may have spills them to local memory (device memory) and slows
down several times; a load the compiler could not vectorise moves fewer bytes per instruction. Both show in
the compiler's output for the target, so they can be checked on any machine, before a GPU run:
1. the six launchers (dwconv_norm, grn, gate; forward and backward) are called with empty CPU tensors of
   every U-Net level's shapes (--dtype activations, float32 parameters and statistics), with Triton's launch
   replaced by a recorder: nothing runs, and the grids, warps and tiles are those a GPU run picks;
2. each distinct launch (kernel, argument types and Triton's specialisation of them, constexprs, warps) is
   compiled for an H100 (sm_90a) as Triton's JIT would, and `ptxas -v` with Triton's flags gives the
   registers per thread, the stack frame and the spill bytes;
3. the global loads in the PTX are counted (instructions in the code, not executions): those of 16 bytes
   (ld.global.v4.b32, the widest a thread can issue) against all of them.

Exit status 0 when no launch spills, 1 when one does (after the table and --json), 2 on bad input.
Needs TRITON_INTERPRET unset: under the interpreter the kernels are Python functions, not compilable.

  python benchmarks/kernel_resources.py --model FCDM-XL --latent-size 32 --batch-size 256 --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from benchmarks.common import add_block_shape_args, fcdm_on_meta
from fcdm_common.cli import HelpFormatter, UserError, run_main
from fcdm_common.io import atomic_write_text
from models.kernels import dwconv_norm, gate, grn, launch

CAPABILITY, ARCH = 90, "sm_90a"  # H100; ptxas refuses this PTX for plain sm_90
PTXAS_FLAGS = ["-lineinfo", "-v", "--regAllocOptLevel=2"]  # what Triton's make_cubin passes (triton 3.8)
LOAD = re.compile(r"\bld\.global\S*")  # ld.global[.qualifiers][.vN].<type><bits>, e.g. ld.global.v4.b32
USED = re.compile(r"Used (\d+) registers")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def load_bytes(op: str) -> int:
    """Bytes one PTX load instruction moves per thread: 16 for ld.global.v4.b32, 2 for ld.global.b16."""
    vec = re.search(r"\.v(\d)\b", op)
    bits = re.search(r"\.[bfsu](\d+)$", op)
    return (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) if bits else 0) // 8


def capture_launches(model, latent: int, batch: int, act: torch.dtype) -> list:
    """(level, JITFunction, args, kwargs, grid) of every kernel launch of one block's forward and backward per
    level, recorded instead of run: the launchers get empty CPU tensors, which no kernel reads or writes."""
    if launch.INTERPRETER:
        raise UserError("the kernels were defined under TRITON_INTERPRET=1 in this process: nothing to compile")

    def new(*shape):
        return torch.empty(shape, dtype=act)

    def f32(*shape):  # parameters and statistics
        return torch.empty(shape, dtype=torch.float32)

    launches, original = [], JITFunction.run
    JITFunction.run = lambda fn, *args, grid, warmup, **kwargs: launches.append((level, fn, args, kwargs, grid))
    try:
        for level, c in enumerate(model.widths):
            n, s, k, hid = batch, latent // 2**level, model.kernel_size, int(model.mlp_ratio * c)
            x, shift, scale, gate_, weight = new(n, s, s, c), new(n, c), new(n, c), new(n, c), f32(c, 1, k, k)
            dwconv_norm.forward(x, weight, f32(c), shift, scale, 1e-6, True)
            dwconv_norm.backward(new(n, s, s, c), x, new(n, s, s, c), f32(n * s * s), f32(n * s * s), weight, scale)
            grn.forward(new(n, s, s, hid), f32(hid), f32(hid), 1e-6)
            grn.backward(new(n, s, s, hid), new(n, s, s, hid), f32(n, hid), f32(hid), 1e-6)
            gate.forward(x, gate_, new(n, s, s, c))
            gate.backward(new(n, s, s, c), gate_, new(n, s, s, c))
    finally:
        JITFunction.run = original
    return launches


def specialise(fn, args, kwargs, backend):
    """(signature, constexprs, attrs, options) of a launch, from Triton's own binder (what JITFunction.run
    compiles: pointer alignment, ints divisible by 16 or equal to 1, i32 / i64 by value). Triton's internal API
    (as of triton 3.8): another version may need this adapted."""
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def resources(fn, signature, constexprs, attrs, options, target, ptxas: str, path: str) -> dict:
    """Registers, stack and spill bytes (ptxas -v) and global loads (PTX) of one compilation; `path` for the PTX."""
    ptx = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                         options=options.__dict__).asm["ptx"]
    with open(path, "w") as f:
        f.write(ptx)
    out = subprocess.run([ptxas, *PTXAS_FLAGS, f"--gpu-name={ARCH}", path, "-o", os.devnull], capture_output=True,
                         text=True)
    used, frame = USED.search(out.stderr), FRAME.search(out.stderr)
    if out.returncode or not used or not frame:
        raise UserError(f"ptxas failed on {fn.__name__} (status {out.returncode}): {out.stderr.strip()[-400:]}")
    loads = LOAD.findall(ptx)
    return {"registers": int(used.group(1)), "stack_frame": int(frame.group(1)),
            "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3)), "loads": len(loads),
            "loads_16b": sum(load_bytes(x) == 16 for x in loads)}


def run(args) -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise UserError("TRITON_INTERPRET=1 is set: under Triton's interpreter the kernels are Python functions and "
                        "cannot be compiled; run with TRITON_INTERPRET unset (no GPU needed)")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    if not os.access(ptxas, os.X_OK):
        raise UserError(f"no ptxas at {ptxas} (it ships with triton's CUDA backend)")
    model, kwargs = fcdm_on_meta(args)
    act = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    target = GPUTarget("cuda", CAPABILITY, 32)
    backend = make_backend(target)
    compiles, rows = {}, []  # distinct compilation key: (fn, signature, constexprs, attrs, options)
    for level, fn, fargs, fkwargs, grid in capture_launches(model, args.latent_size, args.batch_size, act):
        signature, constexprs, attrs, options = specialise(fn, fargs, fkwargs, backend)
        key = (fn.__name__, tuple(signature.items()), repr(constexprs), repr(attrs), options.num_warps)
        compiles.setdefault(key, (fn, signature, constexprs, attrs, options))
        tiles = {p.name: fkwargs[p.name] for p in fn.params
                 if p.is_constexpr and isinstance(fkwargs.get(p.name), (int, bool))}
        rows.append(({"kernel": fn.__name__, "level": level, "width": model.widths[level],
                      "side": args.latent_size // 2**level, "grid": list(grid), "num_warps": options.num_warps,
                      "constexprs": tiles}, key))
    # triton.compile runs its passes without the GIL (Triton's own async compile uses a thread pool too)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        futures = {key: pool.submit(resources, *job, target, ptxas, os.path.join(tmp, f"{i}.ptx"))
                   for i, (key, job) in enumerate(compiles.items())}
        rows = [{**row, **futures[key].result()} for row, key in rows]
    spilling = sum(1 for r in rows if r["spill_stores"] or r["spill_loads"])
    return {"model": args.model, "model_kwargs": kwargs, "latent_size": args.latent_size,
            "batch_size": args.batch_size, "dtype": args.dtype, "target": ARCH, "triton": triton.__version__,
            "compilations": len(compiles), "spilling": spilling, "launches": rows}


def format_report(report: dict) -> str:
    lines = [f"{report['model']} at latent {report['latent_size']}, batch {report['batch_size']}, {report['dtype']}: "
             f"fused-block kernels compiled for {report['target']} (triton {report['triton']})", "",
             "| kernel | level | grid | warps | constexprs | regs | spill st / ld B | stack B | 16-B loads / loads |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["launches"]:
        tiles = " ".join(f"{k}={int(v)}" for k, v in r["constexprs"].items())
        lines.append(f"| {r['kernel']} | {r['level']} | {'x'.join(map(str, r['grid']))} | {r['num_warps']} | {tiles} "
                     f"| {r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['stack_frame']} "
                     f"| {r['loads_16b']} / {r['loads']} |")
    lines += ["", f"{len(report['launches'])} launches ({report['compilations']} distinct compilations), "
                  f"{report['spilling']} with spills"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_block_shape_args(p, "samples per block call: sets the grids and the reductions' pixel splits")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="activation dtype (bf16: the autocast training run; statistics and parameters stay float32)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report (every launch) here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = run(args)
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if report["spilling"]:
        print(f"error: {report['spilling']} launches spill registers (table above)", file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    run_main(main)

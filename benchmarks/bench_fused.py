"""The fused FCDM block (`--kernels triton`, models/kernels) against the torch path, one block per U-Net level.

For every level of --model at --latent-size (its width C and side H x W, at --batch-size):
1. numerics first: the fused and the torch block (forward and every gradient, at --check-batch) against the
   same block in float64, at --dtype; the fused path must be as close as the torch path: within 1.5x of the
   torch path's error plus 1e-3 (bf16) or 1e-5 (fp32; TF32 matmuls on CUDA). A level that fails is not timed;
2. block times, interleaved: forward (no grad) and forward + backward, torch and triton, median of --repeats,
   and the ratio torch / triton;
3. per kernel: the device time of each fused kernel in a profiled forward + backward, the bytes it must
   move and the FLOPs it must do (counted from the shapes, below), its achieved bandwidth against the device's
   measured copy bandwidth (a --copy-gib device-to-device copy, read + write), and its floor
   max(bytes / bandwidth, FLOPs / --vector-tflops): time / floor says how far each kernel is from its bound.

Bytes per kernel (P = N*H*W pixels, C channels, e bytes per activation element, 3C the hidden width):
  dwconv_norm_fwd     read x, write h and d (3 P C e) + mean, rstd (8 P)      FLOPs 2 k^2 P C + 12 P C
  dwconv_norm_bwd     read dh, d, write dd (3 P C e) + mean, rstd (8 P)       FLOPs 16 P C
  dwconv_input_grad   read dd, write dx (2 P C e)                             FLOPs 2 k^2 P C
  dwconv_weight_grad  read x, dd (2 P C e)                                    FLOPs 2 k^2 P C
  grn_stats           read a (3 P C e)                                        FLOPs 20 * 3 P C (erf counted as 15)
  grn_apply           read a, write r (6 P C e)                               FLOPs 20 * 3 P C
  grn_grad_stats      read dr, a (6 P C e)                                    FLOPs 22 * 3 P C
  grn_grad_apply      read dr, a, write da (9 P C e)                          FLOPs 30 * 3 P C
  gate_fwd            read x, o, write out (3 P C e)                          FLOPs 2 P C
  gate_bwd            read dout, o, write d_o (3 P C e)                       FLOPs 3 P C
(per-(sample, channel) vectors and partial sums are a few per cent of these and left out).

Without a GPU it runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, tiny sizes: what the
GPU suite's dry run checks); its times then measure the interpreter, and the per-kernel rows stay empty (the
interpreted kernels are no profiler events).

  python benchmarks/bench_fused.py --model FCDM-XL --latent-size 32 --batch-size 256 --dtype bf16 --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
from typing import Dict, List

import torch

from benchmarks.common import add_block_shape_args, environment, fcdm_on_meta, setup_device, synchronize, timed
from fcdm_common.cli import HelpFormatter, UserError, float_in, non_negative_int, positive_int, run_main, seed_int
from fcdm_common.io import atomic_write_text
from models.fcdm import FCDM, FCDMBlock
from models.kernels import load, unavailable_reason

ACTIVATION = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype: the residual stream's dtype (autocast: bf16)
# name: (activation elements moved per P*C, bytes per pixel, FLOPs per P*C or "conv"): the table of the docstring
KERNEL_COST = {
    "dwconv_norm_fwd": (3, 8, "conv+12"),
    "dwconv_norm_bwd": (3, 8, 16),
    "dwconv_input_grad": (2, 0, "conv"),
    "dwconv_weight_grad": (2, 0, "conv"),
    "grn_stats": (3, 0, 60),
    "grn_apply": (6, 0, 60),
    "grn_grad_stats": (6, 0, 66),
    "grn_grad_apply": (9, 0, 90),
    "gate_fwd": (3, 0, 2),
    "gate_bwd": (3, 0, 3),
}


def kernel_cost(name: str, p: int, c: int, k: int, elem_bytes: int) -> tuple:
    """(bytes, FLOPs) the kernel `name` must move and do for P pixels x C channels with a k x k kernel."""
    per_elem, per_pixel, flops = KERNEL_COST[name]
    conv = 2 * k * k
    f = {"conv": conv, "conv+12": conv + 12}.get(flops, flops)
    return per_elem * p * c * elem_bytes + per_pixel * p, f * p * c


def levels(model: FCDM, latent: int) -> List[dict]:
    """One entry per U-Net level: its width and side."""
    return [{"level": i, "width": w, "side": latent // 2 ** i} for i, w in enumerate(model.widths)]


def block_pair(width: int, model: FCDM, device, seed: int):
    torch.manual_seed(seed)
    blk = FCDMBlock(width, kernel_size=model.kernel_size, mlp_ratio=model.mlp_ratio)
    with torch.no_grad():
        for prm in blk.parameters():  # off the zero init (adaLN and GRN start at zero), so every path counts
            prm.normal_(0, 0.02)
    blk = blk.to(device)
    fused = copy.deepcopy(blk)
    fused.fused = load("triton")
    return blk, fused


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fwd_bwd(blk, x, c, dy, autocast):
    blk.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    c = c.clone().requires_grad_(True)
    with autocast():
        out = blk(x, c)
    out.backward(dy.to(out.dtype))
    return [out, x.grad, c.grad] + [p.grad for p in blk.parameters()]


def timing_inputs(width: int, side: int, args, device):
    """Block input x (--batch-size, side, side, width) in the activation dtype, condition c and output gradient dy."""
    x = torch.randn(args.batch_size, side, side, width, device=device, dtype=ACTIVATION[args.dtype])
    return x, torch.randn(args.batch_size, width, device=device), torch.randn_like(x)


def check_numerics(blk, fused, width, side, args, device, autocast) -> dict:
    """Fused and torch block against float64: worst relative error over the output and every gradient."""
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.check_batch, side, side, width, generator=g)
    c = torch.randn(args.check_batch, width, generator=g)
    dy = torch.randn(args.check_batch, side, side, width, generator=g)
    x, c, dy = x.to(device, ACTIVATION[args.dtype]), c.to(device), dy.to(device)
    truth = copy.deepcopy(blk).double()
    want = fwd_bwd(truth, x.double(), c.double(), dy.double(), contextlib.nullcontext)
    err = {}
    for name, b in (("torch", blk), ("triton", fused)):
        err[name] = max(rel_err(a, w) for a, w in zip(fwd_bwd(b, x, c, dy, autocast), want))
    bound = 1.5 * err["torch"] + (1e-3 if args.dtype == "bf16" else 1e-5)
    return {"torch_max_rel_err": err["torch"], "triton_max_rel_err": err["triton"], "bound": bound,
            "ok": err["triton"] <= bound}


def time_blocks(blk, fused, width, side, args, device, autocast) -> dict:
    """Median forward (no grad) and forward + backward times of both paths, interleaved."""
    x, c, dy = timing_inputs(width, side, args, device)

    def forward(b):
        def run():
            with torch.no_grad(), autocast():
                b(x, c)
        return run

    def train(b):
        return lambda: fwd_bwd(b, x, c, dy, autocast)

    fns = {f"{mode}_{name}": make(b) for name, b in (("torch", blk), ("triton", fused))
           for mode, make in (("forward", forward), ("train", train))}
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(args.warmup):
            timed(fn, device)
    for _ in range(args.repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    out = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}
    for mode in ("forward", "train"):
        out[f"{mode}_speedup"] = out[f"{mode}_torch_ms"] / out[f"{mode}_triton_ms"]
    return out


def copy_bandwidth_gbs(device, gib: float) -> float:
    """Device-to-device copy rate, bytes read + written per second (the practical bandwidth ceiling)."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        times.append(timed(lambda: dst.copy_(src), device))
    return 2 * n * 4 / statistics.median(times) / 1e9


def profile_kernels(fused, width, side, args, device, autocast, bandwidth_gbs) -> List[dict]:
    """Device time per fused kernel in a profiled forward + backward, against its bytes and FLOPs."""
    from torch.profiler import ProfilerActivity, profile  # deferred: loaded only once a level is profiled

    x, c, dy = timing_inputs(width, side, args, device)
    fwd_bwd(fused, x, c, dy, autocast)
    synchronize(device)
    iters = 3 if device.type == "cuda" else 1  # a CPU run only rehearses the code
    on_gpu = device.type == "cuda"  # on a CPU the interpreted kernels are no profiler events: a rehearsal only
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fwd_bwd(fused, x, c, dy, autocast)
        synchronize(device)
    device_us = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0.0) if t is None else t
        device_us[e.key] = device_us.get(e.key, 0.0) + float(t) / iters
    p = args.batch_size * side * side
    rows = []
    for name in KERNEL_COST:
        nbytes, flops = kernel_cost(name, p, width, fused.dwconv.kernel_size, x.element_size())
        us = sum(v for k, v in device_us.items() if k == f"_{name}" or k.startswith(f"_{name}_"))
        floor_us = max(nbytes / (bandwidth_gbs * 1e3), flops / (args.vector_tflops * 1e6) if args.vector_tflops
                       else 0.0)
        rows.append({"kernel": name, "us": us, "bytes": nbytes, "flops": flops,
                     "gbs": nbytes / (us * 1e3) if us else None,
                     "bandwidth_share": nbytes / (us * 1e3) / bandwidth_gbs if us else None,
                     "floor_us": floor_us, "over_floor": us / floor_us if us and floor_us else None})
    total = sum(device_us.values())
    fused_total = sum(r["us"] for r in rows)
    rows.append({"kernel": "(everything else: matmuls, adaLN, small torch ops)", "us": total - fused_total})
    return rows


def run_benchmark(args) -> dict:
    device = setup_device(args)
    reason = unavailable_reason("triton", device.type)
    if reason:
        raise UserError(f"--device {device.type}: {reason}")
    model, _ = fcdm_on_meta(args)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    bandwidth = copy_bandwidth_gbs(device, args.copy_gib)
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "table")},
              "environment": environment(device), "copy_bandwidth_gbs": bandwidth, "levels": []}
    for lv in levels(model, args.latent_size):
        blk, fused = block_pair(lv["width"], model, device, args.seed + lv["level"])
        row = dict(lv, numerics=check_numerics(blk, fused, lv["width"], lv["side"], args, device, autocast))
        report["levels"].append(row)
        if not row["numerics"]["ok"]:
            report["status"] = "failed"
            continue  # no timing of a path that computes something else
        row["times"] = time_blocks(blk, fused, lv["width"], lv["side"], args, device, autocast)
        try:  # a profiler hiccup must not cost the block times above
            row["kernels"] = profile_kernels(fused, lv["width"], lv["side"], args, device, autocast, bandwidth)
        except Exception as e:  # noqa: BLE001
            row["kernels_error"] = f"{type(e).__name__}: {e}"
        del blk, fused
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def format_report(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    lines = [f"{cfg['model']} blocks, latent {cfg['latent_size']}, batch {cfg['batch_size']}, {cfg['dtype']}, "
             f"{env.get('gpu', env['cpu'])}, torch {env['torch']}, {env['date']}"
             + (f"; copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s" if report["copy_bandwidth_gbs"] else ""),
             "| level | C | side | max rel err torch / triton (bound) | fwd torch / triton ms | speedup | "
             "fwd+bwd torch / triton ms | speedup |", "|---|---|---|---|---|---|---|---|"]
    for lv in report["levels"]:
        n, t = lv["numerics"], lv.get("times")
        cells = (f"{t['forward_torch_ms']:.3f} / {t['forward_triton_ms']:.3f} | {t['forward_speedup']:.2f}x | "
                 f"{t['train_torch_ms']:.3f} / {t['train_triton_ms']:.3f} | {t['train_speedup']:.2f}x") if t else \
            "not timed (numerics failed) | | |"
        lines.append(f"| {lv['level']} | {lv['width']} | {lv['side']} | {n['torch_max_rel_err']:.2e} / "
                     f"{n['triton_max_rel_err']:.2e} ({n['bound']:.1e}) | {cells} |")
    for lv in report["levels"]:
        if "kernels" not in lv:
            continue
        lines += ["", f"level {lv['level']} (C {lv['width']}, {lv['side']}x{lv['side']}): per kernel, fwd + bwd",
                  "| kernel | us | MB | GB/s | of copy bw | floor us | time / floor |", "|---|---|---|---|---|---|---|"]
        for r in lv["kernels"]:
            if "bytes" not in r:
                lines.append(f"| {r['kernel']} | {r['us']:.1f} | | | | | |")
                continue
            lines.append(f"| {r['kernel']} | {r['us']:.1f} | {r['bytes'] / 1e6:.1f} | "
                         + (f"{r['gbs']:.0f} | {r['bandwidth_share']:.0%} | " if r["gbs"] else "- | - | ")
                         + f"{r['floor_us']:.1f} | " + (f"{r['over_floor']:.2f}x |" if r["over_floor"] else "- |"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_block_shape_args(p, "samples per timed block call")
    p.add_argument("--check-batch", type=positive_int, default=4,
                   help="samples of the float64 numerics check (default 4)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast (activations bf16, statistics float32) or fp32 (TF32 matmuls on CUDA)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, or cpu under TRITON_INTERPRET=1 (a rehearsal: interpreter times)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls per variant (default 3)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed calls per variant; median (default 10)")
    p.add_argument("--copy-gib", type=float_in(0.001, 64), default=2.0,
                   help="size of the device-to-device copy that measures the bandwidth, GiB (default 2)")
    p.add_argument("--vector-tflops", type=float_in(0.0, lo_open=True), default=None,
                   help="the device's float32 vector (non-tensor-core) peak in TFLOP/s for the FLOP floor, e.g. 67 "
                        "for an H100 SXM (datasheet; default: bytes-only floors)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cpu-allocator", choices=("tuned", "default"), default="tuned", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=seed_int, default=0, help="seed of weights and inputs, 0..2**32-1")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full report here")
    p.add_argument("--table", default=None, metavar="OUT", help="also write the printed tables here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = run_benchmark(args)
    text = format_report(report)
    print(text)
    if args.table:
        atomic_write_text(args.table, text + "\n")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if report.get("status") == "failed":
        raise UserError("the fused block's numbers differ from the torch path's beyond the bound (table above)")
    return report


if __name__ == "__main__":
    run_main(main)

"""Throughput, training-step speed, peak memory and MFU of any registered model, on CPU or CUDA.

Forward throughput follows the paper's protocol (images/s of no-grad forward passes at batch 64,
as DiT's sampling measures it). A training step is forward + backward + AdamW + EMA update with an
MSE loss on the network output against a random target (the loss choice does not change the
network's cost; the iDDPM hybrid loss adds a few elementwise ops). Every measurement has warm-up
iterations, device synchronisation around the timed region, and reports the median of the repeats.
When several variants are measured (`--compare-baseline`, `--compare`), their repeats are
interleaved so that all of them see the same machine load.

Variants:
  optimized (default)  the registered network with its fast paths: channels-last activations,
                       pointwise convs as matmuls, kernel crop, fast GRN, optional bf16 autocast
                       (float32 statistics), `--checkpointing`, `--compile`; AdamW fused (CUDA) or
                       foreach (CPU); foreach EMA.
  baseline             (`--baseline`, FCDM only) models.fcdm_reference.FCDMReference with the same
                       weights: NCHW, 1x1 Conv2d, torch.norm GRN, full kernels, every block
                       checkpointed, no compile, torch's default AdamW, the per-parameter Python EMA
                       loop, at --dtype like the optimized variants: bf16 autocast is how the authors'
                       release trains (accelerate --mixed_precision bf16), fp32 runs TF32 on CUDA.
                       `--baseline-tf32` adds the baseline in fp32/TF32 as a separate, labelled row.

`--ablate` (FCDM) adds variants that change one setting at a time (network, checkpointing, AdamW/EMA
implementation, bf16; `--ablate-compile`: compiled blocks), and `--mode layers` times the layer-level
fast paths (GRN, depthwise conv, pointwise conv) against their plain NCHW forms at every level.
On a shared CPU, `--threads 1` gives far steadier numbers than torch's default thread count.

`--mode sample` times a whole guided sampling loop (`diffusion.sample`: `--sampler`, `--sampling-steps`,
classifier-free guidance `--cfg-scale`, the network run through sampling's fixed-batch wrapper, bf16
autocast with `--dtype bf16`, the whole network torch.compile'd with `--compile` exactly as the sampling
programs' `--compile` does) at each of `--sample-batches` (default 64 and 256) and reports images/s
(batch / median loop time); randomly initialised weights, so only the speed is meaningful. On CPU keep it
tiny: e.g. `--model-kwargs '{"hidden_size": 16, "depths": [1,1,1]}' --latent-size 8 --sample-batches 4 8
--sampling-steps 2 --repeats 1 --warmup 0`.

On CPU the report also counts the process's minor page faults per timed call (memory the allocator
handed back to the kernel and faults in again; `--cpu-allocator`).

MFU = achieved model FLOPs / (--peak-tflops). Model FLOPs per image = 2 x forward MACs (counted on the
meta device), x3 for a training step (forward + backward); recomputation is not counted.

Examples:
  python benchmarks/bench_model.py --model FCDM-XL --device cuda --dtype bf16 --batch-size 256 \\
      --mode train --peak-tflops 989
  python benchmarks/bench_model.py --model FCDM-XL --compare DiT-XL/2 --device cuda --dtype bf16 --mode forward
  python benchmarks/bench_model.py --model FCDM-XL --device cuda --dtype bf16 --mode sample --compile \\
      --sampler dpm++2m --sampling-steps 20 --cfg-scale 4.0 --sample-batches 64 256
  python benchmarks/bench_model.py --model FCDM-S --model-kwargs '{"hidden_size": 64, "depths": [1,2,2,2,1]}' \\
      --latent-size 32 --batch-size 16 --device cpu --mode train --compare-baseline
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.bench_sampling import format_sampling, sampling_benchmark
from benchmarks.common import environment, peak_memory, resolve_latent, setup_device, timed
from diffusion.guidance import CFG_SCALE_HELP, cfg_scale_arg
from fcdm_common.cli import HelpFormatter, UserError, float_in, non_negative_int, positive_int, run_main, seed_int
from fcdm_common.io import atomic_write_text
from models import MODELS, create_model
from models.fcdm import FCDM
from models.fcdm_reference import FCDMReference, GRNReference
from models.kernels import KERNELS, KERNELS_HELP, use_kernels
from models.layers import GRN, DepthwiseConv
from models.summary import count_params, forward_gmacs
from train_gen.ema import create_ema, update_ema, update_ema_reference

# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------


@dataclass
class Variant:
    label: str  # row name in the table
    model_name: str
    baseline: bool  # paper-mode network and training loop (all four settings below at their baseline values)
    network: str = "optimized"  # "optimized" (models registry) or "reference" (FCDMReference)
    checkpointing: str = "none"  # none | selective | full (the reference knows none | full)
    optimizer_impl: str = "auto"  # auto (fused on CUDA, foreach on CPU) | default (torch's choice) | loop
    ema_impl: str = "foreach"  # foreach | loop
    bf16: bool = False  # bf16 autocast
    compile: bool = False  # torch.compile the blocks
    compile_net: bool = False  # torch.compile the whole network instead (one graph, as sampling's --compile)
    kernels: str = "torch"  # optimized FCDM: block implementation, torch or triton (models/kernels)
    handwritten_dw: bool = True  # optimized FCDM: hand-written CPU depthwise backward (else the library's)
    handwritten_grn: bool = True  # optimized FCDM: hand-written GRN backward (else autograd's)
    model: nn.Module = None
    gmacs: float = 0.0  # forward MACs per image, 1e9
    params: int = 0
    results: Dict[str, float] = field(default_factory=dict)
    forward_times: List[float] = field(default_factory=list)
    train_times: List[float] = field(default_factory=list)
    forward_fn: Optional[Callable[[], None]] = None
    train_fn: Optional[Callable[[], None]] = None


def build_model(name: str, kwargs: dict, device: torch.device, latent: Optional[int]) -> nn.Module:
    """Create a registered model; DiT-like models get `input_size` = the latent size."""
    with torch.device("meta"):
        probe = create_model(name, **kwargs)
    if latent is not None and hasattr(probe, "input_size") and "input_size" not in kwargs:
        kwargs = dict(kwargs, input_size=latent)
    with torch.device(device):
        return create_model(name, **kwargs)


def model_gmacs(name: str, kwargs: dict, latent: int) -> tuple[float, int]:
    with torch.device("meta"):
        probe = create_model(name, **kwargs)
    if hasattr(probe, "input_size") and "input_size" not in kwargs:
        with torch.device("meta"):
            probe = create_model(name, **dict(kwargs, input_size=latent))
    try:
        return forward_gmacs(probe, latent), count_params(probe)
    except ValueError as e:
        raise UserError(f"{name} cannot run at latent size {latent}: {e}") from None


def make_variant(label: str, model_name: str, args, baseline: bool, **overrides) -> Variant:
    """A baseline variant (paper mode) or an optimized one with the command-line settings."""
    if baseline:  # the release's precision is the run's: bf16 autocast (its accelerate setting) or fp32
        kw = dict(network="reference", checkpointing="full", optimizer_impl="default", ema_impl="loop",
                  bf16=args.dtype == "bf16")
    else:
        kw = dict(checkpointing=args.checkpointing, bf16=args.dtype == "bf16", compile=args.compile,
                  kernels=args.kernels)
    kw.update(overrides)
    return Variant(label, model_name, baseline, **kw)


def make_optimizer(model: nn.Module, device: torch.device, impl: str) -> torch.optim.Optimizer:
    """AdamW with the paper's hyper-parameters (lr 1e-4, betas (0.9, 0.999), no weight decay).
    auto: fused kernels on CUDA, foreach on CPU; default: torch's own choice (the paper's code);
    loop: the per-parameter for-loop implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    if impl == "default":
        return torch.optim.AdamW(params, **kw)
    if impl == "loop":
        return torch.optim.AdamW(params, foreach=False, **kw)
    if device.type == "cuda":
        return torch.optim.AdamW(params, fused=True, **kw)
    return torch.optim.AdamW(params, foreach=True, **kw)


def prepare_variant(v: Variant, args, device: torch.device, latent: int, kwargs: dict) -> None:
    torch.manual_seed(args.seed)
    model = build_model(v.model_name, dict(kwargs), device, latent)
    if v.network == "reference":
        if not isinstance(model, FCDM):
            raise UserError(f"--baseline needs an FCDM model, got {v.model_name} ({type(model).__name__})")
        model = FCDMReference.from_fcdm(model, grad_checkpointing=v.checkpointing != "none")
    else:
        model.set_grad_checkpointing(v.checkpointing)
        if hasattr(model, "set_handwritten_backward"):
            model.set_handwritten_backward(depthwise=v.handwritten_dw, grn=v.handwritten_grn)
        try:
            use_kernels(model, v.kernels, device.type)
        except ValueError as e:
            raise UserError(f"{v.label}: --kernels {v.kernels}: {e}") from None
    model.train()
    ema = create_ema(model) if args.mode != "forward" else None
    if v.compile_net:
        model.compile()
    elif v.compile:
        if hasattr(model, "compile_blocks"):
            model.compile_blocks()
        else:
            model.compile()
    v.model = model

    in_ch = model.in_channels
    num_classes = model.num_classes
    g = torch.Generator().manual_seed(args.seed)
    n = args.batch_size
    x = torch.randn(n, in_ch, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (n,), generator=g).to(device)
    y = torch.randint(0, num_classes, (n,), generator=g).to(device)
    target = torch.randn(n, model.out_channels, latent, latent, generator=g).to(device)
    use_bf16 = v.bf16

    def autocast():
        if use_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward():
        with torch.no_grad(), autocast():
            model(x, t, y)

    v.forward_fn = forward
    if ema is not None:
        opt = make_optimizer(model, device, v.optimizer_impl)
        ema_update = update_ema_reference if v.ema_impl == "loop" else update_ema

        def train_step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = model(x, t, y)
            loss = F.mse_loss(out.float(), target)
            loss.backward()
            opt.step()
            ema_update(ema, model, 0.9999)

        v.train_fn = train_step


def run_benchmark(args) -> dict:
    device = setup_device(args)
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--model-kwargs is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise UserError("--model-kwargs must be a JSON object")
    for name in [args.model] + ([args.compare] if args.compare else []):
        if name not in MODELS:
            raise UserError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")

    with torch.device("meta"):
        try:
            probe = create_model(args.model, **kwargs)
        except TypeError as e:
            raise UserError(f"--model-kwargs do not fit {args.model}: {e}") from None
    latent = resolve_latent(args, probe.in_channels)

    variants: List[Variant] = []
    if args.compare_baseline:
        variants += [make_variant(f"{args.model} baseline", args.model, args, True),
                     make_variant(f"{args.model} optimized", args.model, args, False)]
        if args.baseline_tf32 and args.dtype == "bf16":
            variants.append(make_variant(f"{args.model} baseline, fp32/TF32", args.model, args, True, bf16=False))
    else:
        kind = "baseline" if args.baseline else "optimized"
        variants.append(make_variant(f"{args.model} {kind}", args.model, args, args.baseline))
    if args.ablate:
        # one change at a time against the optimized variant (or from the baseline)
        m = args.model
        variants += [
            make_variant("ablate: baseline net, no ckpt, foreach AdamW+EMA", m, args, False, network="reference",
                         checkpointing="none", bf16=False, compile=False),
            make_variant("ablate: baseline with foreach AdamW+EMA", m, args, True, optimizer_impl="auto",
                         ema_impl="foreach"),
            make_variant("ablate: optimized, loop AdamW+EMA", m, args, False, optimizer_impl="loop", ema_impl="loop"),
            make_variant("ablate: optimized, selective ckpt", m, args, False, checkpointing="selective"),
            make_variant("ablate: optimized, full ckpt", m, args, False, checkpointing="full"),
            make_variant("ablate: optimized, library depthwise backward", m, args, False, handwritten_dw=False),
            make_variant("ablate: optimized, autograd GRN backward", m, args, False, handwritten_grn=False),
            make_variant(f"ablate: optimized, {'fp32' if args.dtype == 'bf16' else 'bf16 autocast'}", m, args,
                         False, bf16=args.dtype != "bf16"),
        ]
        if args.ablate_compile:
            variants.append(make_variant("ablate: optimized, compiled blocks", m, args, False, compile=True))
    for ckpt, comp, kernels in args.extra_variants:  # --extra-variants: more optimized settings, interleaved
        label = {"": "", "blocks": ", compiled", "net": ", compiled network"}[comp]
        variants.append(make_variant(f"{args.model} optimized, {ckpt} ckpt{label}"
                                     + (f", {kernels} kernels" if kernels != "torch" else ""),
                                     args.model, args, False, checkpointing=ckpt, compile=comp == "blocks",
                                     compile_net=comp == "net", kernels=kernels))
    if args.compare:
        # the compared model is built from its own preset; --model-kwargs apply to --model only
        variants.append(make_variant(f"{args.compare} optimized", args.compare, args, False, compile=False,
                                     kernels="torch"))
        if args.compare_compile:
            variants.append(make_variant(f"{args.compare} optimized, compiled", args.compare, args, False,
                                         compile=True, kernels="torch"))
    for v in variants:
        kw = kwargs if v.model_name == args.model else {}
        v.gmacs, v.params = model_gmacs(v.model_name, kw, latent)
        prepare_variant(v, args, device, latent, kw)

    modes = ["forward", "train"] if args.mode == "both" else [args.mode]
    for mode in modes:
        fns = [(v, v.forward_fn if mode == "forward" else v.train_fn) for v in variants]
        for v, fn in fns:  # warm-up (compilation, allocator, cudnn autotuning)
            for _ in range(args.warmup):
                timed(fn, device)
        faults = {v.label: 0 for v in variants}  # minor page faults of the process during each variant's calls
        for _ in range(args.repeats):  # interleaved repeats: every variant sees the same load
            for v, fn in fns:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                (v.forward_times if mode == "forward" else v.train_times).append(timed(fn, device))
                faults[v.label] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        for v, fn in fns:
            if device.type == "cpu":  # page-faulting fresh memory is a CPU cost (see fcdm_common/cpu.py)
                v.results[f"{mode}_page_faults_per_call"] = faults[v.label] / args.repeats
            mem = peak_memory(fn, device)
            if mem is not None:
                v.results[f"{mode}_peak_mem_gib"] = mem / 2**30

    n = args.batch_size
    for v in variants:
        r = v.results
        r["params_m"] = v.params / 1e6
        r["gmacs_per_image"] = v.gmacs
        if v.forward_times:
            sec = statistics.median(v.forward_times)
            r["forward_s"] = sec
            r["forward_img_per_s"] = n / sec
            r["forward_tflops"] = 2 * v.gmacs * 1e9 * n / sec / 1e12
        if v.train_times:
            sec = statistics.median(v.train_times)
            r["train_step_s"] = sec
            r["train_steps_per_s"] = 1 / sec
            r["train_img_per_s"] = n / sec
            r["train_tflops"] = 3 * 2 * v.gmacs * 1e9 * n / sec / 1e12
        if args.peak_tflops:
            for mode in ("forward", "train"):
                if f"{mode}_tflops" in r:
                    r[f"{mode}_mfu"] = r[f"{mode}_tflops"] / args.peak_tflops

    ratios = {}
    if args.compare_baseline:
        base, opt = variants[0].results, variants[1].results
        for key, label in (("forward_s", "forward"), ("train_step_s", "train")):
            if key in base:
                ratios[f"{label}_speedup_vs_baseline"] = base[key] / opt[key]
                for v in variants[2:]:
                    if ", " in v.label and v.label.startswith(f"{args.model} optimized") and key in v.results:
                        ratios[f"{label}_speedup_vs_baseline[{v.label}]"] = base[key] / v.results[key]
                    elif v.label == f"{args.model} baseline, fp32/TF32" and key in v.results:
                        ratios[f"{label}_speedup_vs_baseline_tf32"] = v.results[key] / opt[key]
    if args.ablate:
        base = variants[0].results
        for v in variants:
            if v.label.startswith("ablate") and "train_step_s" in base:
                ratios[f"train_speedup_vs_first_row[{v.label}]"] = base["train_step_s"] / v.results["train_step_s"]
    if args.compare:
        others = [v for v in variants if v.model_name == args.compare]  # MODEL2, and compiled with --compare-compile
        mains = [v for v in variants if v.model_name == args.model and not v.baseline
                 and not v.label.startswith("ablate")]
        for key, label in (("forward_s", "forward"), ("train_step_s", "train")):
            if key not in others[0].results:
                continue
            best = min(v.results[key] for v in others)  # MODEL2 at its best (eager or compiled)
            for v in mains:
                suffix = "" if v.label == f"{args.model} optimized" else f"[{v.label}]"
                eager = others[0].results[key]
                ratios[f"{label}_speedup_{args.model}_vs_{args.compare}{suffix}"] = eager / v.results[key]
                if len(others) > 1:
                    ratios[f"{label}_speedup_{args.model}_vs_best_{args.compare}{suffix}"] = best / v.results[key]

    report = {
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"latent_size": latent},
        "environment": environment(device),
        "results": {
            v.label: v.results | {
                "model": v.model_name, "baseline": v.baseline, "network": v.network, "checkpointing": v.checkpointing,
                "optimizer_impl": v.optimizer_impl, "ema_impl": v.ema_impl, "bf16": v.bf16, "compile": v.compile,
                "compile_net": v.compile_net, "kernels": v.kernels,
                "handwritten_dw": v.handwritten_dw, "handwritten_grn": v.handwritten_grn,
            }
            for v in variants
        },
        "ratios": ratios,
        "raw_times_s": {v.label: {"forward": v.forward_times, "train": v.train_times} for v in variants},
    }
    if device.type == "cpu":
        # ru_maxrss is in KiB on Linux: the whole process, all variants together
        report["environment"]["process_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


def layer_benchmarks(args) -> dict:
    """Forward + backward time of each FCDM layer-level fast path against its straightforward form,
    at every level of the configured model (widths and feature-map sizes), batch --batch-size:
    GRN (sum of squares in float32 vs torch.norm), depthwise conv (cropped vs full kernel) and the
    pointwise conv (Linear on NHWC vs 1x1 Conv2d on NCHW); and, in the same channels-last layout, the
    hand-written backward passes against the library's (depthwise, CPU) and autograd's (GRN).
    Median of --repeats, interleaved."""
    device = setup_device(args)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    with torch.device("meta"):
        probe = create_model(args.model, **kwargs)
    if not isinstance(probe, FCDM):
        raise UserError("--mode layers needs an FCDM model")
    latent = resolve_latent(args, probe.in_channels)
    n, k, r = args.batch_size, probe.kernel_size, probe.mlp_ratio
    rows = {}
    for level, w in enumerate(probe.widths):
        size = latent // 2**level
        hid = w * r
        x_nhwc = torch.randn(n, size, size, w, device=device)
        h_nhwc = torch.randn(n, size, size, hid, device=device)
        x_cl = x_nhwc.permute(0, 3, 1, 2)  # NCHW view of channels-last memory (what FCDM's convs see)
        x_nchw = x_cl.contiguous()
        h_nchw = h_nhwc.permute(0, 3, 1, 2).contiguous()
        grn, grn_ref, grn_autograd = GRN(hid).to(device), GRNReference(hid).to(device), GRN(hid).to(device)
        grn_autograd.handwritten_backward = False
        dw, dw_library = DepthwiseConv(w, k).to(device), DepthwiseConv(w, k).to(device)
        dw_library.handwritten_backward = False
        for m in (grn, grn_autograd, dw, dw_library):
            nn.init.normal_(m.weight)
        dw_full = nn.Conv2d(w, w, k, padding=k // 2, groups=w).to(device)
        lin, conv1 = nn.Linear(w, hid).to(device), nn.Conv2d(w, hid, 1).to(device)
        cases = {
            "grn": (lambda: grn(h_nhwc.requires_grad_()), lambda: grn_ref(h_nchw.requires_grad_())),
            "depthwise": (lambda: dw(x_nhwc.requires_grad_()), lambda: dw_full(x_nchw.requires_grad_())),
            "pointwise": (lambda: lin(x_nhwc.requires_grad_()), lambda: conv1(x_nchw.requires_grad_())),
            "grn hand-written vs autograd backward": (lambda: grn(h_nhwc.requires_grad_()),
                                                      lambda: grn_autograd(h_nhwc.requires_grad_())),
            "depthwise hand-written vs library backward": (lambda: dw(x_nhwc.requires_grad_()),
                                                           lambda: dw_library(x_nhwc.requires_grad_())),
        }
        for name, (fast, ref) in cases.items():
            times = {"fast": [], "reference": []}
            fns = {"fast": lambda f=fast: f().square().mean().backward(),
                   "reference": lambda f=ref: f().square().mean().backward()}
            for fn in fns.values():
                for _ in range(args.warmup):
                    fn()
            for _ in range(args.repeats):
                for key, fn in fns.items():
                    times[key].append(timed(fn, device))
            fast_s, ref_s = statistics.median(times["fast"]), statistics.median(times["reference"])
            rows[f"level{level} {size}x{size} {name}"] = {
                "fast_ms": fast_s * 1e3, "reference_ms": ref_s * 1e3, "speedup": ref_s / fast_s,
            }
    return {"config": {k: v for k, v in vars(args).items() if k != "json"} | {"latent_size": latent},
            "environment": environment(device), "layers": rows}


def format_layers(report: dict) -> str:
    lines = ["| layer (fwd+bwd) | fast (ms) | reference (ms) | speedup |", "|---|---|---|---|"]
    for name, r in report["layers"].items():
        lines.append(f"| {name} | {r['fast_ms']:.2f} | {r['reference_ms']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    lines = [
        f"device={cfg['device']} dtype={cfg['dtype']} batch={cfg['batch_size']} latent={cfg['latent_size']} "
        f"checkpointing={cfg['checkpointing']} compile={cfg['compile']} repeats={cfg['repeats']} (median)",
        f"torch {env['torch']}, {env.get('gpu', env['cpu'])}, {env['cpu_threads']} threads, "
        f"load {env['load_average']}, {env['date']}"
        + (f", CPU allocator {env['cpu_allocator']}" if "cpu_allocator" in env else ""),
        "| variant | params (M) | GMACs/img | fwd img/s | train steps/s | train img/s | peak mem (GiB) "
        "| MFU fwd | MFU train |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(r, k, fmt):
        return format(r[k], fmt) if k in r else "-"

    for label, r in report["results"].items():
        mem = r.get("train_peak_mem_gib", r.get("forward_peak_mem_gib"))
        faults = r.get("train_page_faults_per_call", r.get("forward_page_faults_per_call"))
        mem = f"{mem:.2f}" if mem is not None else f"n/a (CPU; {faults:,.0f} page faults/call)"
        lines.append(
            f"| {label} | {r['params_m']:.2f} | {r['gmacs_per_image']:.3f} | {f(r, 'forward_img_per_s', '.2f')} | "
            f"{f(r, 'train_steps_per_s', '.3f')} | {f(r, 'train_img_per_s', '.2f')} | {mem} | "
            f"{f(r, 'forward_mfu', '.1%')} | {f(r, 'train_mfu', '.1%')} |"
        )
    for k, v in report["ratios"].items():
        lines.append(f"{k}: {v:.2f}x")
    if "process_max_rss_gib" in env:
        lines.append(f"CPU process max RSS (all variants): {env['process_max_rss_gib']:.2f} GiB")
    return "\n".join(lines)


COMPILE_TOKENS = {"compile": "blocks", "compile-net": "net"}  # --extra-variants: what torch.compile wraps


def _variant_list(value: str) -> list:
    """'selective,none+compile,none+triton+compile-net' -> [("selective", "", "torch"), ("none", "blocks", "torch"),
    ("none", "net", "triton")]: (checkpointing, compiled: "" | "blocks" | "net", kernels)."""
    out = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        ckpt, *extras = item.split("+")
        if ckpt not in ("none", "selective", "full") or not set(extras) <= {*COMPILE_TOKENS, *KERNELS} \
                or len(set(extras)) != len(extras) or len(set(extras) & set(KERNELS)) > 1 \
                or len(set(extras) & set(COMPILE_TOKENS)) > 1:
            raise argparse.ArgumentTypeError(
                f"expected CKPT with optional +compile (the blocks) or +compile-net (the whole network) and "
                f"+torch or +triton kernels (CKPT: none, selective, full), got {item!r}")
        kernels = next((e for e in extras if e in KERNELS), "torch")
        out.append((ckpt, next((COMPILE_TOKENS[e] for e in extras if e in COMPILE_TOKENS), ""), kernels))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="FCDM-XL", help="registered model name (default: FCDM-XL)")
    p.add_argument("--model-kwargs", default=None,
                   help='JSON object of constructor overrides for --model, e.g. \'{"hidden_size": 64}\'')
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default: 64)")
    p.add_argument("--resolution", type=positive_int, default=256,
                   help="image resolution; 4-channel latent models see resolution/8 (default: 256)")
    p.add_argument("--latent-size", type=positive_int, default=None,
                   help="the network's input side length directly (overrides --resolution)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (TF32 on CUDA), or bf16 autocast with float32 statistics; the baseline too (the "
                        "authors' release trains in bf16 autocast)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda when available)")
    p.add_argument("--mode", choices=("forward", "train", "both", "layers", "sample"), default="both",
                   help="forward throughput (no grad), training step, both (default), 'layers': FCDM "
                        "layer fast paths (GRN, depthwise crop, pointwise matmul) against their plain forms, or "
                        "'sample': images/s of a whole guided sampling loop at each --sample-batches")
    p.add_argument("--sampler", default="dpm++2m",
                   help="--mode sample: sampler of sample.py (default dpm++2m; ddpm, ddim, unipc, diffusers:<Class>)")
    p.add_argument("--sampling-steps", type=positive_int, default=20, help="--mode sample: sampler steps (default 20)")
    p.add_argument("--cfg-scale", type=cfg_scale_arg, default=4.0,
                   help=f"--mode sample: guidance scale, {CFG_SCALE_HELP} (default 4.0: two network rows per image)")
    p.add_argument("--sample-batches", type=positive_int, nargs="+", default=[64, 256],
                   help="--mode sample: images per sampling loop, one measurement each (default 64 256)")
    p.add_argument("--checkpointing", choices=("none", "selective", "full"), default="none",
                   help="activation checkpointing of the optimized network (default: none)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks of the optimized network (--mode sample: the whole network, "
                        "as sample.py --compile)")
    p.add_argument("--kernels", choices=KERNELS, default="torch",
                   help=f"optimized FCDM variants: {KERNELS_HELP} (default: torch)")
    p.add_argument("--baseline", action="store_true", help="run the paper-mode baseline instead (FCDM only)")
    p.add_argument("--compare-baseline", action="store_true",
                   help="run baseline and optimized in one process (interleaved) and print the speedup")
    p.add_argument("--baseline-tf32", action="store_true",
                   help="with --compare-baseline and --dtype bf16: also the baseline in fp32 (TF32 on CUDA), a row "
                        "of its own (its ratio mixes the optimizations with bf16's speed)")
    p.add_argument("--ablate", action="store_true",
                   help="FCDM only: add variants that change one thing at a time (network, checkpointing, "
                        "optimizer/EMA implementation), interleaved with the others")
    p.add_argument("--ablate-compile", action="store_true",
                   help="with --ablate: also a variant with torch.compile'd blocks (slow warm-up on CPU)")
    p.add_argument("--compare", default=None, metavar="MODEL2",
                   help="also run this registered model (optimized, its own preset, torch kernels) and print the "
                        "ratio of every --model variant to it")
    p.add_argument("--compare-compile", action="store_true",
                   help="with --compare: also MODEL2 with torch.compile'd blocks; ratios then also against MODEL2 at "
                        "its best (the faster of eager and compiled)")
    p.add_argument("--extra-variants", type=_variant_list, default=[], metavar="LIST",
                   help="more optimized variants of --model timed in the same process (interleaved), comma-"
                        "separated, each CKPT with optional +compile (the blocks) or +compile-net (the whole network) "
                        "and +triton (or +torch) kernels, CKPT none|selective|full, e.g. "
                        "'selective,full,none+compile,none+triton+compile-net'; with --compare-baseline "
                        "each gets its speedup over the baseline. Every variant holds its own weights, AdamW state "
                        "and EMA on the device")
    p.add_argument("--peak-tflops", type=float_in(0.0, lo_open=True), default=None,
                   help="peak dense TFLOPs of the device at --dtype, for model-FLOPs utilisation")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed iterations per variant (default: 2)")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed iterations; the median is reported (default: 5)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cpu-allocator", choices=("tuned", "default"), default="tuned",
                   help="CPU only, process-wide (all variants alike): 'tuned' keeps freed memory in glibc's heap "
                        "(fcdm_common.cpu, what train/sample do on CPU); 'default' leaves malloc as it is, to "
                        "measure that setting in a second run (default: tuned)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for weights and inputs, 0..2**32-1 (default: 0)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full report (incl. raw times) here")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.baseline and args.compare_baseline:
        raise UserError("--baseline and --compare-baseline are exclusive (the comparison includes the baseline)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.mode == "layers":
        report = layer_benchmarks(args)
        print(format_layers(report))
    elif args.mode == "sample":
        report = sampling_benchmark(args)
        print(format_sampling(report))
    else:
        report = run_benchmark(args)
        print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    run_main(main)

"""`benchmarks/bench_model.py --mode sample`: images/s of a whole guided sampling loop (see its --help).

One measurement per batch size: `diffusion.sample` from fresh noise with the chosen sampler and steps,
classifier-free guidance in the same forward call (2 x batch rows per network call when cfg != 1), the
network behind `diffusion.sampling.FixedBatchModel` (fixed forward batch = 2 x batch, bf16 autocast
with --dtype bf16) and, with --compile, `diffusion.compiled.compiled_network` - exactly what
sample.py / sample_ddp.py run. Warm-up loops (which also pay the compile) are left out of the median of
--repeats timed loops, and reported apart (warmup_times: the first holds the compilation).
"""
from __future__ import annotations

import json
import statistics

import torch

import diffusion
from benchmarks.common import environment, resolve_latent, setup_device, timed
from diffusion.compiled import compile_mode, compiled_network
from diffusion.sampling import FixedBatchModel
from fcdm_common.cli import UserError
from models import MODELS, create_model
from models.kernels import use_kernels


def sampling_benchmark(args) -> dict:
    device = setup_device(args)
    if args.model not in MODELS:
        raise UserError(f"unknown model {args.model!r}; registered: {', '.join(sorted(MODELS))}")
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--model-kwargs is not valid JSON: {e}") from None
    torch.manual_seed(args.seed)
    try:
        model = create_model(args.model, **kwargs).to(device).eval()
    except TypeError as e:
        raise UserError(f"--model-kwargs do not fit {args.model}: {e}") from None
    learn_sigma = bool(getattr(model, "learn_sigma", True))
    objective = diffusion.create_diffusion(learn_sigma=learn_sigma)
    try:
        diffusion.check_sampler("diffusion", args.sampler)
    except ValueError as e:
        raise UserError(f"--sampler {args.sampler}: {e}") from None
    if args.sampling_steps > objective.original_num_steps:
        raise UserError(f"--sampling-steps {args.sampling_steps} exceeds the {objective.original_num_steps} "
                        "diffusion steps of the model")
    latent = resolve_latent(args, model.in_channels)
    try:
        use_kernels(model, args.kernels, device.type)  # before compiling: the compiled graph holds them
    except ValueError as e:
        raise UserError(f"--kernels {args.kernels}: {e}") from None
    network = compiled_network(model, device.type) if args.compile else model
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    rows = []
    for batch in args.sample_batches:
        per_call = 2 * batch if args.cfg_scale != 1.0 else batch
        net = FixedBatchModel(network, per_call, autocast, device.type)
        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(batch, model.in_channels, latent, latent, generator=g).to(device)
        y = torch.randint(model.num_classes, (batch,), generator=g).to(device)
        gens = torch.Generator(device).manual_seed(args.seed)

        def loop():
            with torch.no_grad():
                diffusion.sample(net, noise, y, objective=objective, sampler=args.sampler,
                                 num_steps=args.sampling_steps, cfg_scale=args.cfg_scale,
                                 null_label=model.num_classes, generators=gens)

        warmup_times = []  # untimed in the median; the first holds the compilation (what --compile costs once)
        for _ in range(args.warmup):
            warmup_times.append(timed(loop, device))
        times = []
        for _ in range(args.repeats):
            times.append(timed(loop, device))
        med = statistics.median(times)
        rows.append(dict(batch=batch, seconds=med, images_per_s=batch / med, network_calls=net.calls,
                         times=times, warmup_times=warmup_times))
        print(f"batch {batch}: {batch / med:.2f} images/s ({med:.3f} s per loop)", flush=True)
    return dict(mode="sample", model=args.model, model_kwargs=kwargs, latent_size=latent, sampler=args.sampler,
                sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale, dtype=args.dtype,
                compile=bool(args.compile), compile_mode=compile_mode(device.type) if args.compile else None,
                kernels=args.kernels, device=str(device), environment=environment(device), rows=rows)


def format_sampling(report: dict) -> str:
    head = (f"{report['model']} {report['sampler']} {report['sampling_steps']} steps, cfg {report['cfg_scale']}, "
            f"{report['dtype']}{', compiled (' + report['compile_mode'] + ')' if report['compile'] else ''}, "
            f"{report.get('kernels', 'torch')} kernels, latent {report['latent_size']}, {report['device']}")
    lines = [head, "| batch | images/s | s per loop |", "|---|---|---|"]
    lines += [f"| {r['batch']} | {r['images_per_s']:.2f} | {r['seconds']:.3f} |" for r in report["rows"]]
    return "\n".join(lines)

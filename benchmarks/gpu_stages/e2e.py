"""Step e2e: the real programs as a user runs them, end to end, each with its wall time; its worker writes the random
stand-ins for the downloaded networks (an SD-VAE-shaped AutoencoderKL, an Inception-v3)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.gpu_stages.core import REPO, SUITE_PY, Suite, stage, worker


@stage("e2e", min_s=60)
def step_e2e(suite: Suite) -> dict:
    """The real programs one after another, as a user runs them on one GPU, each with its wall time:
    digits upscaled to ImageNet's size as an ImageFolder, a random AutoencoderKL of SD-VAE's shape and a
    random Inception (no downloads), extract_features.py, make_reference.py (torch backend),
    `accelerate launch train.py` in bf16 with a sample grid, `torchrun sample_ddp.py` (DDIM, guidance),
    evaluate.py (torch backend) and sample_ddp.py with autoguidance. The numbers of the metrics mean nothing
    (random networks); the wall times and that every stage runs do."""
    s = suite.sizes
    root = suite.work / "e2e"
    images, assets, store, runs = root / "images", root / "assets", root / "store.zarr", root / "runs"
    size = 8 * s.e2e_upscale
    py = sys.executable
    device = s.device
    model = ["--model", s.e2e_model] + (["--model-kwargs", s.e2e_model_kwargs] if s.e2e_model_kwargs else [])
    stages = [
        ("dataset", [py, REPO / "preparation" / "make_demo_dataset.py", "--out", images, "--upscale", s.e2e_upscale]),
        ("assets", [py, SUITE_PY, "--worker", "e2e_assets", "--vae-widths", ",".join(map(str, s.vae_widths)),
                    "--vae-layers", s.vae_layers, "--vae-image", size, "--table", assets,
                    "--json", suite.work / "e2e_assets.json"]),
        ("extract", [py, REPO / "preparation" / "extract_features.py", "--data-path", images, "--zarr-path",
                     store, "--image-size", size, "--vae", "sd", "--hf-model-dir", assets / "vae",
                     "--per-proc-batch-size", 64, "--num-workers", 4 if device == "cuda" else 0, "--device", device]),
        ("reference", [py, REPO / "evaluations" / "make_reference.py", "--data-path", images, "--out",
                       root / "ref.npz", "--image-size", size, "--backend", "torch", "--inception-weights",
                       assets / "inception.safetensors", "--num-images", s.e2e_ref_images, "--device", device]),
        ("train", [py, "-m", "accelerate.commands.launch", "--num_processes", 1, "--num_machines", 1,
                   "--mixed_precision", "bf16", "--dynamo_backend", "no", REPO / "train_gen" / "train.py", *model,
                   "--zarr-path", store, "--results-dir", runs, "--exp-name", "e2e", "--global-batch-size",
                   s.e2e_batch, "--max-train-steps", s.e2e_steps, "--ckpt-every", s.e2e_steps, "--log-every",
                   max(1, s.e2e_steps // 5), "--sample-every", s.e2e_steps, "--grid-sampler", "ddim",
                   "--grid-steps", s.e2e_sampling_steps, "--mixed-precision", "bf16", "--num-workers",
                   4 if device == "cuda" else 0, "--hf-model-dir", assets / "vae"]),
    ]
    out = {"stages": {}, "sizes": {"image": size, "model": s.e2e_model, "train_steps": s.e2e_steps,
                                   "global_batch": s.e2e_batch, "samples": s.e2e_samples,
                                   "ddim_steps": s.e2e_sampling_steps, "ref_images": s.e2e_ref_images}}

    def go(name, cmd, timeout_s=120, env=None):
        res = suite.run(cmd, timeout_s, env)
        out["stages"][name] = {"seconds": res["seconds"], "rc": res["rc"], "command": " ".join(map(str, cmd))}
        if res["rc"] != 0:
            out["stages"][name]["tail"] = res["tail"]
            why = "timed out" if res["timed_out"] else f"exited {res['rc']}"
            raise RuntimeError(f"stage {name} {why}")

    # the launchers: CPU runs of accelerate and torchrun need no GPU settings
    env = {} if device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}
    try:
        for name, cmd in stages:
            go(name, cmd, timeout_s=180 if name == "train" else 120, env=env)
        ckpts = sorted((runs / "e2e" / "checkpoints").glob("*.pt"))
        if not ckpts:
            raise RuntimeError(f"training wrote no checkpoint under {runs / 'e2e'}")
        out["grid_written"] = any((runs / "e2e").rglob("*.png"))
        go("sample", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 1,
                      REPO / "train_gen" / "sample_ddp.py", "--ckpt", ckpts[-1], "--sample-dir", root / "samples",
                      "--num-fid-samples", s.e2e_samples, "--sampler", "ddim", "--num-sampling-steps",
                      s.e2e_sampling_steps, "--cfg-scale", 1.5, "--per-proc-batch-size", min(256, s.e2e_samples),
                      "--forward-batch", min(256, s.e2e_samples),
                      "--precision", "bf16", "--label-sampling", "balanced", "--keep-pngs", "false",
                      "--device", device, "--hf-model-dir", assets / "vae"], env=env)
        archives = sorted((root / "samples").glob("*.npz"))
        if not archives:
            raise RuntimeError("sample_ddp.py wrote no archive")
        go("evaluate", [py, REPO / "train_gen" / "evaluate.py", "--sample-batch", archives[-1], "--ref-batch",
                        root / "ref.npz", "--backend", "torch", "--inception-weights",
                        assets / "inception.safetensors", "--device", device, "--output-json", root / "eval.json"])
        out["metrics"] = json.loads((root / "eval.json").read_text()).get("metrics")
        # autoguidance through the same program (the run's checkpoint guiding itself: the code path and its
        # wall time next to the "sample" stage's classifier-free guidance; a real guide is an earlier checkpoint)
        go("sample_autoguidance", [py, REPO / "train_gen" / "sample_ddp.py", "--ckpt", ckpts[-1], "--guide-ckpt",
                                   ckpts[-1], "--sample-dir", root / "samples_ag", "--num-fid-samples", s.e2e_samples,
                                   "--sampler", "ddim", "--num-sampling-steps", s.e2e_sampling_steps, "--cfg-scale",
                                   1.5, "--per-proc-batch-size", min(256, s.e2e_samples), "--forward-batch",
                                   min(256, s.e2e_samples), "--precision", "bf16", "--label-sampling", "balanced",
                                   "--keep-pngs", "false", "--device", device, "--hf-model-dir", assets / "vae"],
           env=env)
    except RuntimeError as e:
        out |= {"status": "failed", "error": str(e)}
    out["total_seconds"] = round(sum(v["seconds"] for v in out["stages"].values()), 2)
    return out


@worker("e2e_assets")
def worker_e2e_assets(args) -> dict:
    """Random stand-ins for the downloaded networks of the end-to-end pass, saved the way users keep the
    real ones: an AutoencoderKL of the given shape as a diffusers folder (OUT/vae) and an Inception-v3
    state_dict for the torch evaluation backend (OUT/inception.safetensors)."""
    import torch  # deferred: the suite's own process runs without torch; only this worker needs it
    from diffusers import AutoencoderKL  # deferred, as torch above
    from safetensors.torch import save_file  # deferred, as torch above

    from evaluations.features_torch import build_inception  # deferred, as torch above

    out = Path(args.table)
    widths = tuple(int(w) for w in args.vae_widths.split(","))
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                  up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                  layers_per_block=args.vae_layers, latent_channels=4,
                  sample_size=args.vae_image).save_pretrained(out / "vae")
    inception = build_inception()
    for m in inception.modules():  # torchvision's own initialisation is skipped by build_inception
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(m.weight, std=0.05)
    save_file({k: v.contiguous() for k, v in inception.state_dict().items()}, str(out / "inception.safetensors"))
    return {"vae": str(out / "vae"), "inception": str(out / "inception.safetensors")}

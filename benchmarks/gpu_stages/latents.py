"""Step latents: the latent side of the data path, an SD-VAE-sized random AutoencoderKL encoding images (fp32, bf16)
in its worker, and the training loader copying batches to the device (bench_data.py)."""
from __future__ import annotations

import json
import sys
import tempfile
import time

from benchmarks.gpu_stages.core import REPO, SUITE_PY, Suite, stage, worker

BENCH_DATA = REPO / "benchmarks" / "bench_data.py"


@stage("latents", min_s=25)
def step_latents(suite: Suite) -> dict:
    s = suite.sizes
    out = {}
    res = suite.run([sys.executable, SUITE_PY, "--worker", "vae", "--device", s.device,
                     "--vae-widths", ",".join(map(str, s.vae_widths)), "--vae-layers", s.vae_layers,
                     "--vae-image", s.vae_image, "--batch-size", s.vae_batch, "--repeats", max(s.repeats, 1),
                     "--json", suite.work / "vae.json"], timeout_s=120)
    out["vae_encode"] = json.loads((suite.work / "vae.json").read_text()) if res["rc"] == 0 else \
        {"status": "timeout" if res["timed_out"] else "failed", "tail": res["tail"]}
    if suite.remaining() < 20:
        out["loader"] = {"status": "skipped", "reason": "budget"}
        return out
    path = suite.work / "loader.json"
    cmd = [sys.executable, BENCH_DATA, "--count", s.loader_count, "--batch-size", s.loader_batch, "--steps",
           s.loader_steps, "--warmup", 2, "--repeats", 2, "--device", s.device, "--json", path]
    res = suite.run(cmd, timeout_s=120)
    out["loader"] = json.loads(path.read_text()) if res["rc"] == 0 else \
        {"status": "timeout" if res["timed_out"] else "failed", "tail": res["tail"]}
    out["loader"]["command"] = " ".join(map(str, cmd))
    if any(isinstance(v, dict) and v.get("status") for v in out.values()):
        out["status"] = "failed"
    return out


@worker("vae")
def worker_vae(args) -> dict:
    """Encode random images with a random AutoencoderKL of the given shape (saved and loaded back the way
    extract_features.py loads a snapshot), fp32 and bf16: images/s of encode_moments."""
    import torch  # deferred: the suite's own process runs without torch; only this worker needs it
    from diffusers import AutoencoderKL  # deferred, as torch above

    from models.autoencoders import load_autoencoder  # deferred, as torch above

    widths = tuple(int(w) for w in args.vae_widths.split(","))
    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                          up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                          layers_per_block=args.vae_layers, latent_channels=4, sample_size=args.vae_image)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = {"vae_config": {"block_out_channels": list(widths), "layers_per_block": args.vae_layers,
                          "latent_channels": 4, "image_size": args.vae_image, "batch_size": args.batch_size},
           "encoder_params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            vae = load_autoencoder("sd", hf_model_dir=tmp, device=device, dtype=dtype)
            x = torch.rand(args.batch_size, 3, args.vae_image, args.vae_image, device=device) * 2 - 1
            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
            vae.encode_moments(x)
            sync()
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                mean, std = vae.encode_moments(x)
                sync()
                times.append(time.perf_counter() - t)
            assert mean.shape == (args.batch_size, 4, args.vae_image // 8, args.vae_image // 8), mean.shape
            best = min(times)
            out[name] = {"img_per_s": args.batch_size / best, "batch_s": best, "times_s": times,
                         "hours_for_1_28m_images": 1_281_167 * 2 / (args.batch_size / best) / 3600}  # + hflip
            if device.type == "cuda":
                out[name]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            del vae
    return out

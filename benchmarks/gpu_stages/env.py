"""Step env: the machine (GPU, memory, driver, torch/CUDA/cuDNN and package versions, bf16 and TF32 settings) and
a bf16 matmul rate, which the later steps use as this machine's practical peak for their MFU."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

from benchmarks.gpu_stages.core import SUITE_PY, Suite, stage, worker


@stage("env", min_s=10)
def step_env(suite: Suite) -> dict:
    s = suite.sizes
    res = suite.run([sys.executable, SUITE_PY, "--worker", "env", "--device", s.device, "--matmul-n", s.matmul_n,
                     "--json", suite.work / "env.json"], timeout_s=120)
    if res["rc"] != 0:
        return {"status": "failed", "tail": res["tail"]}
    env = json.loads((suite.work / "env.json").read_text())
    env["wheels"] = os.environ.get("FCDM_GPU_WHEELS", "(suite not started through gpu_suite.sh)")
    if env.get("bf16_matmul_tflops") and s.device == "cuda":
        suite.peak_tflops = float(env["bf16_matmul_tflops"])
    return env


@worker("env")
def worker_env(args) -> dict:
    import torch  # deferred: the suite's own process runs without torch; only this worker needs it

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for dist in ("diffusers", "zarr", "numcodecs", "accelerate", "triton", "numpy", "pytest", "timm", "torchvision"):
        try:
            env[f"{dist}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[f"{dist}_version"] = "not installed"
    device = torch.device(args.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30,
                "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                "bf16_supported": torch.cuda.is_bf16_supported()}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable ({e})"
    env["tf32_default"] = {"matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                           "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    env["tf32_in_benchmarks"] = "on (bench_model.py and train.py --tf32 true enable it on CUDA)"
    # a practical bf16 peak: mean of 10 square matmuls after 3 warm-ups
    n = args.matmul_n
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    env["bf16_matmul_tflops"] = 10 * 2 * n**3 / (time.perf_counter() - t) / 1e12
    env["bf16_matmul_n"] = n
    return env

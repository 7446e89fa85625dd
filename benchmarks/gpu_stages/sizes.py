"""Problem sizes of one suite run: the real one on a GPU (`GPU`) and the dry run's tiny ones on the CPU (`DRY`).

Kept apart from the stages because every stage reads them: a new measurement adds its fields here, with the
value the GPU run uses and a tiny one for the dry run, which takes the same code paths in CI."""
from __future__ import annotations

import dataclasses
from typing import Optional

TINY_FCDM = '{"hidden_size": 16, "depths": [1, 1, 1], "num_classes": 10}'


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run: the real suite (GPU) or the dry run (CPU, tiny)."""
    device: str  # "cuda" or "cpu"
    model: str  # the FCDM preset
    model_kwargs: Optional[str]  # JSON overrides of the preset (dry run: a tiny network)
    dit: str  # the DiT compared in the forward step
    latent256: int  # latent side of ImageNet 256 (SD-VAE /8)
    latent512: int  # latent side of ImageNet 512
    train_batch: int  # global batch of the training steps (paper: 256)
    forward_batch: int  # batch of the forward-throughput protocol (paper: 64)
    sample_batch: int  # batch of the sampling loop
    warmup: int  # untimed iterations per variant
    repeats: int  # timed iterations per variant (median reported)
    compile: bool  # include torch.compile'd variants
    vae_widths: tuple  # AutoencoderKL block_out_channels
    vae_layers: int  # layers_per_block
    vae_image: int  # image side encoded
    vae_batch: int  # images per encode call
    loader_count: int  # items in the random latent store of the loader benchmark
    loader_batch: int
    loader_steps: int
    matmul_n: int  # side of the square bf16 matmul of the env step
    forward_dtypes: tuple  # bench_model --dtype of the forward step (fp32 = TF32 on CUDA)
    ckpt512: tuple  # checkpointing modes of the 512 step
    test_timeout_s: int  # the pytest step's own cap
    e2e_upscale: int  # the end-to-end pass: digits upscaled to this factor (8x8 -> 8K x 8K images)
    e2e_model: str  # its FCDM preset
    e2e_model_kwargs: Optional[str]
    e2e_steps: int  # training steps (bf16, under accelerate launch)
    e2e_batch: int  # global batch
    e2e_samples: int  # samples drawn by sample_ddp.py under torchrun
    e2e_sampling_steps: int  # DDIM steps
    e2e_ref_images: int  # images of the reference batch
    repa_batch: int  # batch of the alignment-cost step (halved after an out-of-memory, down to a quarter)
    repa_encoder: str  # bench_repa.py --encoder: dinov2-b (DINOv2-B/14's architecture) or tiny
    repa_site: str  # the aligned site (enc1: 16x16 at 32x32 latents, DINOv2-B/14's grid at 224)
    repa_projector_width: int  # hidden width of the projector (REPA: 2048)
    repa_repeats: int  # timed steps per variant (interleaved; median)
    flow_batch: int  # batch of the flow-schedule step (three networks with AdamW and EMA in one process)
    flow_repeats: int  # timed iterations per schedule (interleaved; median)


GPU = Sizes(device="cuda", model="FCDM-XL", model_kwargs=None, dit="DiT-XL/2", latent256=32, latent512=64,
            train_batch=256, forward_batch=64, sample_batch=256, warmup=2, repeats=3, compile=True,
            vae_widths=(128, 256, 512, 512), vae_layers=2, vae_image=256, vae_batch=64, loader_count=4096,
            loader_batch=256, loader_steps=40, matmul_n=8192, forward_dtypes=("bf16", "fp32"),
            ckpt512=("selective", "full"), test_timeout_s=150, e2e_upscale=32, e2e_model="FCDM-S",
            e2e_model_kwargs=None, e2e_steps=300, e2e_batch=64, e2e_samples=256, e2e_sampling_steps=50,
            e2e_ref_images=1797, repa_batch=32, repa_encoder="dinov2-b", repa_site="enc1", repa_projector_width=2048,
            repa_repeats=10, flow_batch=32, flow_repeats=7)
# one dtype / mode where the GPU run loops over two: the same code, fewer processes
DRY = Sizes(device="cpu", model="FCDM-S", model_kwargs=TINY_FCDM, dit="DiT-S/2", latent256=8, latent512=16,
            train_batch=2, forward_batch=2, sample_batch=2, warmup=0, repeats=1, compile=False,
            vae_widths=(32, 32, 32, 32), vae_layers=1, vae_image=32, vae_batch=2, loader_count=64,
            loader_batch=8, loader_steps=2, matmul_n=64, forward_dtypes=("bf16",), ckpt512=("selective",),
            test_timeout_s=60, e2e_upscale=4, e2e_model="FCDM-S", e2e_model_kwargs=TINY_FCDM, e2e_steps=4,
            e2e_batch=8, e2e_samples=16, e2e_sampling_steps=3, e2e_ref_images=16, repa_batch=2, repa_encoder="tiny",
            repa_site="enc0", repa_projector_width=64, repa_repeats=1, flow_batch=2,
            flow_repeats=1)  # TINY_FCDM has 2 levels: no enc1

"""Drawing samples from a checkpoint: sample.py (a quick grid), sample_ddp.py (FID archives), the evaluation
during training and the benchmarks all go through `generate` with one `SamplerSettings`.

Reproducibility contract: sample i is a function of (global seed, i) and the settings only.
- `sample_generator(seed, i)` is a CPU `torch.Generator` seeded from numpy's SeedSequence((seed, i)).
  From it, in this order, come the random label (always drawn, so the noise is the same in both label
  modes), the initial noise and every random draw of the sampler (`diffusion.sample` with a list of
  per-sample generators). Balanced labels are i % num_classes.
- The network (and the VAE decoder) always run on batches of exactly `forward_batch` rows
  (`FixedBatchModel`): the last chunk is padded. GEMM/convolution kernels pick their blocking from the
  matrix shape, so a row computed in a batch of 3 and in a batch of 8 can differ in the last bits (we
  measured ~2e-6 on CPU with a tiny FCDM), enough to flip uint8 pixels after many sampling steps; with
  one fixed shape every row is computed by the same kernel and is independent of its neighbours, so the
  images do not depend on --per-proc-batch-size or on the number of processes.

Writing PNGs and ADM archives is evaluations/archives.py.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import diffusion
from diffusion import DIFFUSION_SAMPLERS, FLOW_SAMPLERS, check_sampler  # one list of samplers, in diffusion/
from diffusion.compiled import compiled_network
from diffusion.flow_schedules import TIME_SHIFT_RANGE, time_shift_arg
from diffusion.guidance import (
    CFG_SCALE_HELP,
    GUIDANCE_MODES,
    Guide,
    OrderedInterval,
    cfg_scale_arg,
    check_guide_fits,
    guidance_level_arg,
    guidance_space,
    parse_cfg_channels,
    resolve_guidance,
)
from fcdm_common.cli import UserError, alias_help, float_in, non_negative_int, positive_int, str2bool
from fcdm_common.cpu import tune_cpu_allocator
from fcdm_common.images import to_uint8
from models.checkpoints import load_checkpoint, model_from_checkpoint
from models.dit import dit_checkpoint_from_state_dict
from models.kernels import KERNELS, KERNELS_HELP, kernels_problem, use_kernels
from models.latent_space import check_decoder_matches, spec_for_checkpoint, wrap_decoder

DIT_SAMPLE_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)  # the classes of DiT's sample.py grid
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

__all__ = [
    "DIFFUSION_SAMPLERS", "FLOW_SAMPLERS", "DIT_SAMPLE_LABELS", "SamplingSetup", "FixedBatchModel",
    "add_sampler_args", "SamplerSettings", "resolve_sampler", "sample_seed", "sample_generator", "sample_labels",
    "load_setup", "load_guide", "generate", "decode_to_uint8", "ddim_eta_arg", "tolerance_arg", "time_shift_arg",
    "check_num_steps",
]


# ----------------------------------------------------------------------------- seeds and labels
def sample_seed(global_seed: int, index: int) -> int:
    """A 63-bit seed that depends on (global_seed, index) only (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([int(global_seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_generator(global_seed: int, index: int) -> torch.Generator:
    """The CPU generator that owns every random draw of sample `index`."""
    return torch.Generator(device="cpu").manual_seed(sample_seed(global_seed, index))


def label_and_noise(gen: torch.Generator, num_classes: int, latent_shape: Sequence[int]):
    """The first two draws of a sample's generator: its random label, then its initial noise (C, H, W)."""
    label = int(torch.randint(num_classes, (1,), generator=gen))  # first draw: the random label
    noise = torch.randn(tuple(latent_shape), generator=gen)  # then the initial noise (C, H, W)
    return label, noise


def sample_labels(global_seed: int, indices: Iterable[int], num_classes: int, mode: str) -> np.ndarray:
    """int64 labels of the given sample indices: "balanced" i % num_classes, "random" the first draw of
    each sample's generator (the same draw `generate` makes)."""
    indices = [int(i) for i in indices]
    if mode == "balanced":
        return np.asarray([i % num_classes for i in indices], dtype=np.int64)
    if mode != "random":
        raise ValueError(f"label mode must be 'random' or 'balanced', got {mode!r}")
    return np.asarray([int(torch.randint(num_classes, (1,), generator=sample_generator(global_seed, i)))
                       for i in indices], dtype=np.int64)


# ----------------------------------------------------------------------------- command-line flags
# guidance flags' types (scale, interval, channels): diffusion/guidance.py
# DDIM's eta scales the noise of each step; above 1 the coefficient sqrt(1 - abar_prev - sigma^2) of the
# predicted noise can go negative under the root (NaN images): eta in [0, 1] (1 = DDPM-like noise)
ddim_eta_arg = float_in(0.0, 1.0)
tolerance_arg = float_in(0.0, lo_open=True)  # dopri5's atol/rtol: finite and > 0


def checked_value(flag: str, arg_type, value):
    """`value` if the argparse `type=` of `flag` accepts it (as the command line would), else UserError."""
    try:
        return arg_type(value)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"{flag}: {e}") from None


def add_sampler_args(parser, cfg_scale_default: float = 1.0, forward_batch_default: int = 64) -> None:
    """The sampler, guidance, precision and VAE flags both sampling scripts share."""
    g = parser.add_argument_group("sampler")
    g.add_argument("--sampler", default=None, metavar="NAME",
                   help="diffusion checkpoints: ddpm, ddim (our loops), dpm++2m, dpm++2m-karras, unipc, euler, heun "
                        "or diffusers:<SchedulerClassName> (diffusers schedulers configured from the checkpoint's "
                        "beta schedule; they drop the learned-variance channels, except DDPMScheduler); flow "
                        "checkpoints: euler, heun, sde, dopri5 (adaptive, --atol/--rtol). Default: ddpm (or ddim "
                        "with --ddpm false) for diffusion, sde (the paper's Euler-Maruyama) for flow")
    g.add_argument("--ddpm", type=str2bool, default=None, metavar="BOOL",
                   help="diffusion checkpoints: true = DDPM (ancestral), false = DDIM; kept from the original README")
    g.add_argument("--num-sampling-steps", type=positive_int, default=250,
                   help="sampling steps (DDPM/DDIM respacing, diffusers inference steps, ODE steps or SDE model "
                        "calls; unused by dopri5): >= 1, at most the checkpoint's diffusion steps T (1000) for "
                        "diffusion checkpoints, >= 2 for the flow sde sampler")
    g.add_argument("--atol", type=tolerance_arg, default=1e-6, help="dopri5: absolute tolerance, > 0 (SiT: 1e-6)")
    g.add_argument("--rtol", type=tolerance_arg, default=1e-3, help="dopri5: relative tolerance, > 0 (SiT: 1e-3)")
    g.add_argument("--compile", type=str2bool, default=False, metavar="BOOL",
                   help="torch.compile the network at the fixed --forward-batch shape (CUDA: mode "
                        "max-autotune-no-cudagraphs); the first batch pays the compile time")
    g.add_argument("--kernels", choices=KERNELS, default="torch", help=KERNELS_HELP)
    g.add_argument("--ddim-eta", type=ddim_eta_arg, default=0.0,
                   help="DDIM eta in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like noise)")
    g.add_argument("--time-shift", type=time_shift_arg, default=None, metavar="A",
                   help="flow checkpoints: shift the sampler's time grid, t' = A t / (1 + (A - 1) t) (t = 1 is data; "
                        "A < 1 spends more steps near noise; SD3's shift s is A = 1/s), A in "
                        f"[{TIME_SHIFT_RANGE[0]:g}, {TIME_SHIFT_RANGE[1]:g}]; default: the shift the checkpoint "
                        "was trained with (1 = none)")
    g = parser.add_argument_group("guidance")
    g.add_argument("--cfg-scale", "--guidance-scale", dest="cfg_scale", type=cfg_scale_arg, default=cfg_scale_default,
                   help=alias_help(f"guidance scale w {CFG_SCALE_HELP}; the same scale for either --guidance mode",
                                   "--guidance-scale"))
    g.add_argument("--guidance", choices=GUIDANCE_MODES, default=None,
                   help="cfg: classifier-free guidance (the model without its class); autoguidance: guidance by a "
                        "weaker model, --guide-ckpt (Karras et al. 2024). Default: autoguidance when --guide-ckpt is "
                        "given, else cfg")
    g.add_argument("--guide-ckpt", default=None, metavar="PATH",
                   help="autoguidance: the guide checkpoint, e.g. an early checkpoint of the same run or a smaller "
                        "model trained on the same latents (same objective, classes and sample shape)")
    g.add_argument("--guide-use-ema", type=str2bool, default=True, metavar="BOOL",
                   help="autoguidance: the guide's EMA weights (default true) or its raw weights (false)")
    g.add_argument("--cfg-channels", default="all",
                   help="guide 'all' prediction channels (default) or only the first K (3 = DiT / original FCDM)")
    g.add_argument("--guidance-interval", type=guidance_level_arg, nargs=2, default=None, metavar=("LO", "HI"),
                   action=OrderedInterval,
                   help="apply guidance only at noise levels in [LO, HI], 0 <= LO <= HI <= 1 (0 = data, 1 = noise; "
                        "Kynkaanniemi et al. 2024)")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="network precision: fp32, or bf16 autocast (sampler math stays float32)")
    g.add_argument("--forward-batch", type=non_negative_int, default=forward_batch_default,
                   help="rows per network/VAE call; batches are split and padded to exactly this many rows so the "
                        "images do not depend on the batch size or process count (0 = no padding, fastest)")
    g.add_argument("--use-ema", type=str2bool, default=True, metavar="BOOL",
                   help="sample from the EMA weights (default true) or the raw weights (false)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    v = parser.add_argument_group("autoencoder (default: what the checkpoint's config records)")
    v.add_argument("--vae", choices=("sd", "none"), default=None,
                   help="'sd' = a diffusers autoencoder (AutoencoderKL/AutoencoderDC, class from its config), "
                        "'none' = pixel-space model")
    v.add_argument("--hf-model-name", default=None, help="Hugging Face repository of the VAE (downloads if needed)")
    v.add_argument("--hf-model-dir", default=None, help="local snapshot folder of the VAE (wins over --hf-model-name)")


def check_num_steps(objective, sampler: str, num_steps: int, flag: str = "--num-sampling-steps",
                    whose: str = "the checkpoint's") -> None:
    """UserError when `num_steps` does not fit the sampler and the checkpoint's objective: a diffusion model
    has T training steps (1000), and every diffusion sampler (respaced DDPM/DDIM, diffusers schedulers) picks
    its steps among them, so more than T is refused; flow samplers integrate a continuous time and take any
    count (the SDE sampler at least 2)."""
    if num_steps < 1:
        raise UserError(f"{flag} must be >= 1, got {num_steps}")
    total = getattr(objective, "original_num_steps", None)
    if total is not None and sampler != "dopri5" and num_steps > total:
        raise UserError(f"{flag} {num_steps} exceeds {whose} {total} diffusion steps; "
                        f"a diffusion sampler takes at most {total}")
    if sampler == "sde" and num_steps < 2:
        raise UserError(f"the SDE sampler needs {flag} >= 2")


def resolve_sampler(objective: str, sampler: Optional[str] = None, ddpm: Optional[bool] = None) -> str:
    """The sampler to use for a checkpoint's objective, from --sampler and the legacy --ddpm flag."""
    if objective not in ("diffusion", "flow"):
        raise UserError(f"checkpoint objective {objective!r} is unknown; expected 'diffusion' or 'flow'")
    if sampler is not None:
        try:
            check_sampler(objective, sampler)
        except ValueError as e:
            raise UserError(f"--sampler {sampler}: {e}") from None
        if ddpm is not None and objective == "diffusion" and (sampler == "ddpm") != ddpm:
            raise UserError(f"--sampler {sampler} contradicts --ddpm {str(ddpm).lower()}; pass only one of them")
        return sampler
    if objective == "flow":
        if ddpm is not None:
            raise UserError("--ddpm applies to diffusion checkpoints; this is a flow checkpoint, "
                            "use --sampler euler|heun|sde")
        return "sde"
    return "ddpm" if ddpm is None or ddpm else "ddim"


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn, in one value: sample.py and sample_ddp.py (`from_args`), the training grids, the
    evaluation during training and `generate` all take it."""
    sampler: str  # ddpm, ddim, a diffusers preset or diffusers:<Class> (diffusion); euler, heun, sde, dopri5 (flow)
    num_steps: int  # sampling steps (unused by dopri5)
    cfg_scale: float = 1.0  # guidance scale w (1: a single conditional pass)
    cfg_channels: Union[str, int] = "all"  # guided prediction channels: "all" or the first k
    guidance_interval: Optional[Tuple[float, float]] = None  # guide only at noise levels in [lo, hi]
    ddim_eta: float = 0.0  # DDIM's eta
    precision: str = "fp32"  # network precision: fp32 or bf16 autocast
    forward_batch: int = 0  # rows per network/VAE call (0: whatever the sampler passes)
    atol: float = 1e-6  # dopri5 tolerances
    rtol: float = 1e-3
    compile: bool = False  # torch.compile the network
    time_shift: Optional[float] = None  # flow: the time grid's shift a (None: the checkpoint's)
    guidance: str = "cfg"  # "cfg" (the null label) or "autoguidance" (the setup's guide network)
    kernels: Optional[str] = None  # the networks' block implementation, torch or triton (None: as they are set)

    def __post_init__(self):
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {self.guidance!r}")

    def sample_kwargs(self) -> dict:
        """The arguments of `diffusion.sample` these settings fix (the guide network comes from the setup)."""
        return dict(sampler=self.sampler, num_steps=self.num_steps, cfg_scale=self.cfg_scale,
                    cfg_channels=self.cfg_channels, guidance_interval=self.guidance_interval, ddim_eta=self.ddim_eta,
                    atol=self.atol, rtol=self.rtol, time_shift=self.time_shift)

    @classmethod
    def from_args(cls, args, setup: "SamplingSetup") -> "SamplerSettings":
        """Validated settings from parsed `add_sampler_args` flags (UserError on bad values)."""
        sampler = resolve_sampler(setup.objective_name, args.sampler, args.ddpm)
        check_num_steps(setup.objective, sampler, int(args.num_sampling_steps))
        interval = None
        if args.guidance_interval is not None:  # the flag's type and action checked it; a caller's namespace too
            lo, hi = (float(v) for v in args.guidance_interval)
            if not 0.0 <= lo <= hi <= 1.0:
                raise UserError(f"--guidance-interval {lo} {hi} must satisfy 0 <= LO <= HI <= 1")
            interval = (lo, hi)
        if args.forward_batch < 0:
            raise UserError(f"--forward-batch must be >= 0, got {args.forward_batch}")
        # the flags' own types, again for a caller's namespace that did not come through argparse
        checked_value("--cfg-scale", cfg_scale_arg, args.cfg_scale)
        checked_value("--ddim-eta", ddim_eta_arg, args.ddim_eta)
        if sampler == "dopri5":
            checked_value("--atol", tolerance_arg, args.atol)
            checked_value("--rtol", tolerance_arg, args.rtol)
        guide_ckpt = getattr(args, "guide_ckpt", None)
        guidance = resolve_guidance(getattr(args, "guidance", None), guide_ckpt)
        if guidance == "autoguidance" and setup.guide is None:
            raise UserError(f"--guide-ckpt {guide_ckpt} was not loaded; pass it to load_setup(guide_ckpt=...)")
        time_shift = getattr(args, "time_shift", None)
        if time_shift is not None:
            if setup.objective_name != "flow":
                raise UserError(f"--time-shift applies to flow checkpoints; {setup.ckpt_path} is a "
                                f"{setup.objective_name} checkpoint")
            time_shift = checked_value("--time-shift", time_shift_arg, time_shift)
        kernels = getattr(args, "kernels", "torch")
        for net in [setup.model] + ([setup.guide.model] if guidance == "autoguidance" else []):
            if problem := kernels_problem(net, kernels, setup.device.type):
                raise UserError(f"--kernels {kernels}: {problem}")
        return cls(sampler=sampler, num_steps=int(args.num_sampling_steps), cfg_scale=float(args.cfg_scale),
                   cfg_channels=parse_cfg_channels(args.cfg_channels, setup.latent_shape[0]),
                   guidance_interval=interval, ddim_eta=float(args.ddim_eta), precision=args.precision,
                   forward_batch=int(args.forward_batch), atol=float(args.atol), rtol=float(args.rtol),
                   compile=bool(args.compile), guidance=guidance, time_shift=time_shift, kernels=kernels)

    def effective_time_shift(self, setup: "SamplingSetup") -> Optional[float]:
        """The shift the flow samplers use (this override or the checkpoint's); None for diffusion."""
        if setup.objective_name != "flow":
            return None
        return float(self.time_shift) if self.time_shift is not None else float(setup.objective.time_shift)


def guidance_text(settings: SamplerSettings, setup: "SamplingSetup") -> str:
    """How the samples are guided, for log lines: "cfg 4.0", "autoguidance 2.0 by FCDM-S step 10000 (ema)",
    with the flow time shift when it is not 1."""
    if settings.guidance == "autoguidance" and setup.guide is not None:
        g = setup.guide
        text = (f"autoguidance {settings.cfg_scale} by {g.model_name}"
                + (f" step {g.step}" if g.step is not None else "") + f" ({'ema' if g.use_ema else 'raw'})")
    else:
        text = f"cfg {settings.cfg_scale}"
    shift = settings.effective_time_shift(setup)
    return text if shift in (None, 1.0) else f"{text}, time shift {shift:g}"


# ----------------------------------------------------------------------------- model, objective, VAE
@dataclass
class SamplingSetup:
    """Everything rebuilt from a checkpoint that sampling needs."""
    model: torch.nn.Module  # the network in eval mode on `device`
    objective: object  # diffusion.SpacedDiffusion or diffusion.FlowMatching
    objective_name: str  # "diffusion" | "flow"
    vae: object  # models.autoencoders.IdentityVAE or DiffusersAutoencoder
    config: dict  # the checkpoint's run config
    latent_shape: Tuple[int, int, int]  # (C, H, W) the model samples
    num_classes: int  # labels 0..num_classes-1; num_classes is the null label
    model_name: str  # registry name of the network
    ckpt_path: Path  # the checkpoint file
    use_ema: bool  # EMA (True) or raw weights
    vae_settings: dict = field(default_factory=dict)  # vae, hf_model_name, hf_model_dir, scaling_factor
    device: torch.device = torch.device("cpu")  # where sampling runs
    guide: Optional[Guide] = None  # autoguidance: the weaker model (load_guide), None without one

    @property
    def null_label(self) -> int:
        return self.num_classes


def _latent_shape(config: dict, in_channels: int, downsample: int, path) -> Tuple[int, int, int]:
    data = config.get("data") or {}
    if data.get("latent_shape"):
        shape = tuple(int(v) for v in data["latent_shape"])
        if len(shape) != 3:
            raise UserError(f"{path}: config data.latent_shape {list(shape)} is not [C, H, W]")
        return shape
    if data.get("image_size"):
        side = int(data["image_size"]) // downsample
        return (in_channels, side, side)
    raise UserError(f"{path}: the config records neither data.latent_shape nor data.image_size; "
                    "the sample size cannot be known")


def load_setup(ckpt_path, *, model_name: Optional[str] = None, use_ema: bool = True, vae: Optional[str] = None,
               hf_model_name: Optional[str] = None, hf_model_dir: Optional[str] = None, device="cpu",
               guide_ckpt: Optional[str] = None, guide_use_ema: bool = True) -> SamplingSetup:
    """Load a checkpoint and rebuild the network, the objective and the VAE decoder, checking they fit; with
    `guide_ckpt`, also the autoguidance guide (checked to fit the model, see `load_guide`)."""
    path = Path(ckpt_path)
    device = torch.device(device)
    if device.type == "cpu":
        tune_cpu_allocator()  # reuse freed activations instead of page-faulting them in every forward pass

    ckpt = load_checkpoint(path, adapt=lambda obj: dit_checkpoint_from_state_dict(obj, model_name))
    config = ckpt["config"]
    if model_name is not None and model_name != config["model"]:
        raise UserError(f"--model {model_name} does not match checkpoint {path}, which holds a {config['model']}; "
                        f"pass --model {config['model']} or leave --model out")
    model = model_from_checkpoint(ckpt, use_ema=use_ema, path=path).to(device)
    del ckpt
    setup = setup_from_model(model, config, path=path, use_ema=use_ema, vae=vae, hf_model_name=hf_model_name,
                             hf_model_dir=hf_model_dir, device=device)
    if guide_ckpt is not None:
        setup.guide = load_guide(guide_ckpt, config, setup.num_classes, setup.latent_shape,
                                 main=f"the model checkpoint {path}",
                                 downsample=int(setup.vae.downsample), use_ema=guide_use_ema, device=device)
    return setup


def load_guide(guide_ckpt, main_config: dict, num_classes: int, latent_shape, *, main: str, downsample: int,
               use_ema: bool = True, device="cpu") -> Guide:
    """The autoguidance guide of a model (its run config, class count and sample shape; `main` names it in
    messages): the frozen network of `guide_ckpt` in eval mode on `device`, after checking that it shares the
    model's objective, latent space, classes and sample shape (one UserError naming both otherwise)."""
    path = Path(guide_ckpt)
    if not path.is_file():
        raise UserError(f"--guide-ckpt {path}: file not found")
    ckpt = load_checkpoint(path)  # a checkpoint with its run config (a plain DiT state dict records no data)
    config = ckpt["config"]
    model = model_from_checkpoint(ckpt, use_ema=use_ema, path=path)
    step = ckpt.get("step")
    del ckpt
    shape = _latent_shape(config, int(model.in_channels), downsample, path)
    check_guide_fits(guidance_space(main_config, num_classes, latent_shape),
                     guidance_space(config, int(model.num_classes), shape), main, path)
    model = model.to(torch.device(device)).eval().requires_grad_(False)
    return Guide(model=model, path=path, model_name=str(config["model"]), use_ema=use_ema,
                 step=None if step is None else int(step))


def setup_from_model(model: torch.nn.Module, config: dict, *, path, use_ema: bool = True, vae: Optional[str] = None,
                     hf_model_name: Optional[str] = None, hf_model_dir: Optional[str] = None,
                     device="cpu") -> SamplingSetup:
    """The SamplingSetup of a network already in memory (eval mode, on `device`) and its run config: what
    `load_setup` builds after loading a checkpoint, and what train.py's in-training evaluation samples with."""
    path = Path(path)
    device = torch.device(device)
    objective_name = config["objective"]
    try:
        objective = diffusion.create_objective(objective_name, **(config.get("objective_kwargs") or {}))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot rebuild objective {objective_name!r} from the config: {e}") from None

    data_cfg = config.get("data") or {}
    spec = spec_for_checkpoint(config, vae, hf_model_name, hf_model_dir)
    settings = spec.to_dict()
    if not settings["shift_factor"]:
        del settings["shift_factor"]  # unshifted latents: sample folders are named and recorded without a shift
    decoder = spec.load(device=device)
    check_decoder_matches(decoder, data_cfg, path)  # normalised runs: the statistics belong to this VAE
    decoder = wrap_decoder(decoder, data_cfg.get("latent_norm"))  # (x * std_c + mean_c) before decoding
    in_ch = int(model.in_channels)
    if int(decoder.latent_channels) != in_ch:
        raise UserError(f"the VAE ({spec.vae}) has {decoder.latent_channels} latent channels but model "
                        f"{config['model']} in {path} takes {in_ch}; pass the VAE the model was trained with "
                        f"(--vae/--hf-model-dir)")
    latent_shape = _latent_shape(config, in_ch, int(decoder.downsample), path)
    if latent_shape[0] != in_ch:
        raise UserError(f"{path}: config latent_shape {list(latent_shape)} disagrees with the model's {in_ch} "
                        "input channels")
    return SamplingSetup(model=model, objective=objective, objective_name=objective_name, vae=decoder, config=config,
                         latent_shape=latent_shape, num_classes=int(model.num_classes), model_name=config["model"],
                         ckpt_path=path, use_ema=use_ema, vae_settings=settings, device=device)


# ----------------------------------------------------------------------------- fixed-shape forward passes
def run_fixed_batches(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor],
                      forward_batch: int) -> torch.Tensor:
    """fn(*chunk) over chunks of exactly `forward_batch` rows (the last padded by repeating its final row),
    concatenated and trimmed to the input length. forward_batch 0: one call on the whole batch."""
    n = tensors[0].shape[0]
    if forward_batch <= 0 or n == forward_batch:
        return fn(*tensors)
    outs = []
    for start in range(0, n, forward_batch):
        chunk = [x[start:start + forward_batch] for x in tensors]
        m = chunk[0].shape[0]
        if m < forward_batch:
            pad = forward_batch - m
            chunk = [torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) for x in chunk]
        outs.append(fn(*chunk)[:m])
    return torch.cat(outs)


class FixedBatchModel:
    """Callable like the network, model(x, t, y): runs it in fixed-size chunks under optional autocast and
    returns float32. Counts calls and rows (`calls`, `rows`) for tests and benchmarks."""

    def __init__(self, model: Callable, forward_batch: int = 0, autocast_dtype: Optional[torch.dtype] = None,
                 device_type: str = "cpu"):
        self.model = model  # raw network model(x, t, y)
        self.forward_batch = int(forward_batch)  # rows per call, 0 = whatever the sampler passes
        self.autocast_dtype = autocast_dtype  # None = fp32, torch.bfloat16 = bf16 autocast
        self.device_type = device_type  # "cpu" or "cuda", for torch.autocast
        self.calls = 0  # network invocations
        self.rows = 0  # rows evaluated, padding included

    def _forward(self, x, t, y):
        self.calls += 1
        self.rows += x.shape[0]
        ctx = (torch.autocast(self.device_type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            return self.model(x, t, y).float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return run_fixed_batches(self._forward, (x, t, y), self.forward_batch)


# ----------------------------------------------------------------------------- sampling
def decode_to_uint8(vae, latents: torch.Tensor, forward_batch: int = 0) -> np.ndarray:
    """Scaled latents (N, C, h, w) -> uint8 images (N, H, W, 3), decoding in fixed-size chunks."""
    with torch.no_grad():
        images = run_fixed_batches(lambda z: vae.decode(z).float(), (latents,), forward_batch)
    return to_uint8(images)


def generate(setup: SamplingSetup, indices: Sequence[int], settings: SamplerSettings, *, seed: int,
             label_mode: str = "random", labels: Optional[Sequence[int]] = None, progress: bool = False,
             counter: Optional[FixedBatchModel] = None, stats: Optional[dict] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Sample the images of `indices` with `settings` -> (uint8 (N, H, W, 3), int64 labels (N,)); sample i is a
    function of (seed, i) and the settings only.

    Labels: explicit `labels` (one per index) or `label_mode` ("random" | "balanced"). `counter`: a
    FixedBatchModel to run the network through (to count calls); built from the settings by default.
    stats: dict that receives "nfe"."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("no sample indices given")
    if labels is not None and len(labels) != len(indices):
        raise ValueError(f"{len(labels)} labels for {len(indices)} samples")
    gens = [sample_generator(seed, i) for i in indices]
    drawn = [label_and_noise(g, setup.num_classes, setup.latent_shape) for g in gens]
    if labels is not None:
        y = [int(v) for v in labels]
        bad = [v for v in y if not 0 <= v < setup.num_classes]
        if bad:
            raise UserError(f"class labels {bad} are out of range for {setup.model_name} in {setup.ckpt_path}; "
                            f"use labels in 0..{setup.num_classes - 1}")
    elif label_mode == "balanced":
        y = [i % setup.num_classes for i in indices]
    elif label_mode == "random":
        y = [lab for lab, _ in drawn]
    else:
        raise ValueError(f"label_mode must be 'random' or 'balanced', got {label_mode!r}")
    device = setup.device
    noise = torch.stack([n for _, n in drawn]).to(device)  # (N, C, H, W)
    y_t = torch.tensor(y, dtype=torch.long, device=device)
    if settings.kernels is not None:  # before compiling: the compiled graph holds them
        use_kernels(setup.model, settings.kernels, device.type)
    network = compiled_network(setup.model, device.type) if settings.compile else setup.model
    net = counter if counter is not None else FixedBatchModel(
        network, settings.forward_batch, PRECISIONS[settings.precision], device.type)
    guide = None
    if settings.guidance == "autoguidance":
        if setup.guide is None:
            raise ValueError("autoguidance settings need a setup with a guide (load_setup(guide_ckpt=...))")
        if settings.kernels is not None:
            use_kernels(setup.guide.model, settings.kernels, device.type)
        guide_network = compiled_network(setup.guide.model, device.type) if settings.compile else setup.guide.model
        guide = FixedBatchModel(guide_network, settings.forward_batch, PRECISIONS[settings.precision], device.type)
    with torch.no_grad():
        latents = diffusion.sample(net, noise, y_t, objective=setup.objective, null_label=setup.null_label,
                                   progress=progress, generators=gens, stats=stats, guide=guide,
                                   **settings.sample_kwargs())
    if latents.shape[1] != setup.latent_shape[0]:  # learned sigma: the sampler returns only x
        latents = latents[:, :setup.latent_shape[0]]
    return decode_to_uint8(setup.vae, latents, settings.forward_batch), np.asarray(y, dtype=np.int64)

"""DiT: the Diffusion Transformer baseline (Peebles & Xie, "Scalable Diffusion Models with
Transformers", ICCV 2023), registered as DiT-S/2, DiT-B/2, DiT-L/2 and DiT-XL/2 so that FCDM and DiT
run through the same training, sampling and benchmark code.

The network (Section 3.2 and Figure 3 of the DiT paper):

    latent (N, C, H, W) -> patchify (p x p conv, stride p) + fixed 2D sin-cos position embedding
      -> depth x DiT block with adaLN-Zero -> final adaLN LayerNorm + Linear -> unpatchify

A DiT block computes, from the condition c = t_emb + y_emb, six vectors
(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) with a zero-initialised
SiLU -> Linear(D, 6D), and

    x = x + gate_msa * Attention(LN(x) * (1 + scale_msa) + shift_msa)
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

(LayerNorm without affine, eps 1e-6; MLP ratio 4 with tanh-GELU). Table 1 of the DiT paper gives the
sizes: S (12 layers, width 384, 6 heads), B (12, 768, 12), L (24, 1024, 16), XL (28, 1152, 16);
DiT-XL/2 has 675M parameters and 118.6 GFLOPs at 256x256 (32x32x4 latents, 256 tokens).
The layers are timm's `PatchEmbed`, `Attention` and `Mlp` under DiT's module names, exactly as
facebookresearch/DiT builds them, so DiT's released state dicts (plain dicts of the EMA weights,
e.g. DiT-XL-2-256x256.pt) load as they are: see `normalize_dit_state_dict` and `is_dit_state_dict`.
timm's Attention runs `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
kernels on GPU).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from models.layers import TimestepEmbedder, resolve_checkpoint_mode, run_block
from models.registry import MODELS, register

# ----------------------------------------------------------------------------------------------
# Position embedding
# ----------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(pos * w), cos(pos * w)] with w_i = 10000^(-i / (dim/2)). pos (M,) -> (M, dim)."""
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos embedding (MAE / DiT): half the channels encode the row, half the column.
    Returns (grid_size**2, dim) in row-major token order."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    gw, gh = np.meshgrid(coords, coords)  # gw varies along the row (x), gh along the column (y)
    # first half from the x coordinate, second from y, as in MAE's get_2d_sincos_pos_embed
    return np.concatenate([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], axis=1)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def modulate_tokens(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) * (1 + scale) + shift with per-sample (N, D) vectors."""
    return torch.addcmul(shift[:, None, :], x, 1 + scale[:, None, :])


def _tanh_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


class LabelEmbedder(nn.Module):
    """The class table under DiT's name (`embedding_table`), num_classes + 1 rows (the null label last)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)  # (N, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT paper, Figure 3 right)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        # deferred: timm.layers imports torchvision and torch._dynamo (~1.5 s per process); only DiT needs it
        from timm.layers import Attention, Mlp

        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)  # timm: qkv, proj; SDPA
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=_tanh_gelu, drop=0)  # fc1, fc2
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, T, D) tokens; c: (N, D) condition
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = torch.addcmul(x, gate1[:, None, :], self.attn(modulate_tokens(self.norm1(x), shift1, scale1)))
        return torch.addcmul(x, gate2[:, None, :], self.mlp(modulate_tokens(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then Linear D -> p * p * C_out per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate_tokens(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion Transformer. `forward(x, t, y)`: x (N, C_in, S, S) NCHW latents with S = input_size,
    t (N,) timesteps, y (N,) labels in [0, num_classes] (num_classes = null label).
    Returns (N, C_out, S, S) with C_out = 2 * C_in when learn_sigma else C_in."""

    def __init__(
        self,
        input_size: int = 32,  # latent side length S (256x256 images -> 32)
        patch_size: int = 2,  # tokens are p x p latent patches
        in_channels: int = 4,  # latent channels
        hidden_size: int = 1152,  # token width D
        depth: int = 28,  # number of DiT blocks
        num_heads: int = 16,  # attention heads
        mlp_ratio: float = 4.0,  # MLP expansion
        num_classes: int = 1000,  # class labels 0..num_classes-1; num_classes is the null label
        class_dropout_prob: float = 0.1,  # label dropout for classifier-free guidance (training only)
        learn_sigma: bool = True,  # also predict the iDDPM variance interpolation
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.learn_sigma = learn_sigma
        self.checkpoint_mode = "none"
        self.grid_size = input_size // patch_size

        from timm.layers import PatchEmbed  # deferred, as in DiTBlock

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)  # patchify conv
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)  # + the null label
        pos = torch.tensor(sincos_2d(hidden_size, self.grid_size), dtype=torch.float32)[None]  # (1, T, D)
        self.register_buffer("pos_embed", pos, persistent=False)  # fixed, rebuilt from the config
        self._register_load_state_dict_pre_hook(self._accept_dit_layout)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears (and the patchify conv as a matrix), zero biases,
        normal(0.02) label table and timestep MLP, zero adaLN outputs and zero final linear."""
        if self.pos_embed.device.type != "meta":
            pos = torch.from_numpy(sincos_2d(self.hidden_size, self.grid_size)).float()[None]
            self.pos_embed.copy_(pos)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _accept_dit_layout(self, state_dict, prefix, *args, **kwargs) -> None:
        """load_state_dict pre-hook: DiT's checkpoints carry the fixed `pos_embed` (a frozen parameter
        there, a non-persistent buffer here). It is checked against our sin-cos table, not loaded."""
        for old, new in _LEGACY_KEYS.items():  # short key names (x_embedder.weight, ...) -> DiT's names
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        key = prefix + "pos_embed"
        if key in state_dict:
            theirs = state_dict.pop(key)
            ours = torch.from_numpy(sincos_2d(self.hidden_size, self.grid_size)).float()[None]
            if tuple(theirs.shape) != tuple(ours.shape) or not torch.allclose(theirs.float().cpu(), ours, atol=1e-5):
                raise ValueError(f"the state dict's pos_embed {tuple(theirs.shape)} is not DiT's fixed 2D sin-cos "
                                 f"table for {self.grid_size}x{self.grid_size} tokens of width {self.hidden_size} "
                                 f"{tuple(ours.shape)}; it belongs to a different model or input size")

    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        """Recompute blocks in backward: True/'full', 'selective' (keep matmul outputs), False/'none'."""
        mode = resolve_checkpoint_mode(enable)
        self.checkpoint_mode = mode

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile every block in place."""
        compile_kwargs.setdefault("dynamic", False)  # blocks see fixed shapes
        for blk in self.blocks:
            blk.compile(**compile_kwargs)

    def label_drop_shape(self, n: int) -> tuple:
        """Shape of the boolean label-dropout mask for a batch of n (one embedder, so always (n,))."""
        return (n,)

    def drop_labels(self, y: torch.Tensor, drop_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace labels by the null label with probability class_dropout_prob (training only), from
        `drop_mask` (bool (N,)) when the caller draws it, else from torch's global RNG."""
        if not self.training or self.class_dropout_prob <= 0:
            return y
        if drop_mask is None:
            drop_mask = torch.rand(y.shape, device=y.device) < self.class_dropout_prob
        elif tuple(drop_mask.shape) != tuple(y.shape) or drop_mask.dtype != torch.bool:
            raise ValueError(f"drop_mask must be a bool tensor of shape {tuple(y.shape)}, "
                             f"got {drop_mask.dtype} {tuple(drop_mask.shape)}")
        return torch.where(drop_mask, torch.full_like(y, self.num_classes), y)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, S, S); each token's features are ordered (p_row, p_col, C)."""
        n, p, g, c = x.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (N, C, g, p, g, p)
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, s, s):
            raise ValueError(f"DiT expects x of shape (N, {self.in_channels}, {s}, {s}), got {tuple(x.shape)}")
        n = x.shape[0]
        if t.shape != (n,) or y.shape != (n,):
            raise ValueError(f"t and y must have shape ({n},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        y = self.drop_labels(y, drop_mask)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for blk in self.blocks:
            h = run_block(blk, self.checkpoint_mode, h, c)  # (N, T, D)
        h = self.final_layer(h, c)  # (N, T, p*p*C_out)
        return self.unpatchify(h)  # (N, C_out, S, S)


# ----------------------------------------------------------------------------------------------
# DiT's released checkpoints (facebookresearch/DiT: plain state dicts of the EMA weights)
# ----------------------------------------------------------------------------------------------

_LEGACY_KEYS = {"x_embedder.weight": "x_embedder.proj.weight", "x_embedder.bias": "x_embedder.proj.bias",
                "y_embedder.weight": "y_embedder.embedding_table.weight"}
_DIT_MARKER_KEYS = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight",
                    "blocks.0.attn.qkv.weight", "final_layer.linear.weight", "pos_embed")


def is_dit_state_dict(obj) -> bool:
    """True for a plain state dict in DiT's key layout (no wrapper dict), as DiT's public .pt files are."""
    return (isinstance(obj, dict) and all(k in obj for k in _DIT_MARKER_KEYS)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def dit_checkpoint_from_state_dict(state_dict: dict, model_name: Optional[str]) -> Optional[dict]:
    """Wrap a plain DiT state dict as our checkpoint layout ({"ema", "config"}; see models/checkpoints.py),
    its config read off the tensor shapes: input size from pos_embed, in/out channels from the patchify
    conv and the final linear, classes from the label table. None when `state_dict` is not one.
    `model_name` (the --model flag) must be a registered DiT whose width and depth match; ValueError else."""
    if not is_dit_state_dict(state_dict):
        return None
    if not model_name or not model_name.startswith("DiT-"):
        raise ValueError("this is a plain DiT state dict (e.g. DiT's released DiT-XL-2-256x256.pt), which records "
                         "no config: pass --model with its DiT variant, e.g. --model DiT-XL/2")
    w = state_dict["x_embedder.proj.weight"]  # (D, C_in, p, p)
    width, in_ch, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    tokens = int(state_dict["pos_embed"].shape[1])
    grid = int(round(tokens ** 0.5))
    out_ch = int(state_dict["final_layer.linear.weight"].shape[0]) // (p * p)
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    rows = int(state_dict["y_embedder.embedding_table.weight"].shape[0])
    kwargs = dict(input_size=grid * p, in_channels=in_ch, learn_sigma=out_ch == 2 * in_ch, num_classes=rows - 1)
    dits = sorted(n for n in MODELS if n.startswith("DiT-"))
    if model_name not in dits:
        raise ValueError(f"--model {model_name} is not a registered DiT variant; use one of {', '.join(dits)}")
    with torch.device("meta"):
        probe = MODELS[model_name](**kwargs)
    if (probe.hidden_size, probe.depth, probe.patch_size) != (width, depth, p):
        raise ValueError(f"the state dict is a DiT of width {width}, depth {depth}, patch {p}, not {model_name} "
                         f"(width {probe.hidden_size}, depth {probe.depth}, patch {probe.patch_size})")
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final_layer.linear gives {out_ch} channels per pixel for {in_ch} input channels")
    config = {"model": model_name, "model_kwargs": kwargs, "objective": "diffusion", "objective_kwargs": {},
              "data": {"latent_shape": [in_ch, grid * p, grid * p], "num_classes": rows - 1},
              "vae": {}, "source": "plain DiT state dict (EMA weights)"}
    return {"ema": state_dict, "config": config}


# Table 1 of the DiT paper (patch size 2): DiT-S/2 33.0M, B/2 130.5M, L/2 458.1M, XL/2 675M params.
def _dit(depth: int, width: int, heads: int, /, **overrides) -> DiT:
    kwargs = dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=2)
    kwargs.update(overrides)
    return DiT(**kwargs)


@register("DiT-S/2", input_size_arg="input_size")
def dit_s_2(**kw):
    return _dit(12, 384, 6, **kw)


@register("DiT-B/2", input_size_arg="input_size")
def dit_b_2(**kw):
    return _dit(12, 768, 12, **kw)


@register("DiT-L/2", input_size_arg="input_size")
def dit_l_2(**kw):
    return _dit(24, 1024, 16, **kw)


@register("DiT-XL/2", input_size_arg="input_size")
def dit_xl_2(**kw):
    return _dit(28, 1152, 16, **kw)

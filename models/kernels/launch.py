"""Launch geometry of the fused block kernels: tile shapes, warps and reduction splits, the jit helpers that index a
program's tile, and the two launch patterns most kernels share (`elementwise`, `per_sample_sums`).

Every kernel works on channels-last activations seen as a (pixels, channels) matrix. Two profiles choose
the tile shapes:
- "gpu": tiles of a few thousand elements (registers), 4 or 8 warps, per-sample reductions split over
  pixel ranges until there are enough programs to fill the device;
- "interpreter": Triton's CPU interpreter (`TRITON_INTERPRET=1`) runs every program and every operation in
  Python, so its cost is programs x operations: tiles as large as the problem, one split.
The choice is deterministic (no autotuning), so a run's numbers do not depend on a timing race: resuming
a run reproduces it bit for bit. `use_profile` overrides the automatic choice (the tests run the gpu
profile's small tiles under the interpreter, to exercise the loops and masks a GPU run takes).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton.jit when the kernels are defined
_INTERPRETED = tl.constexpr(INTERPRETER)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 x in `dtype`, rounded to nearest (ties to even), as the GPU's conversion rounds. Triton's CPU
    interpreter truncates float32 -> bfloat16 (twice the rounding error), so there the rounding is done on the
    bits: add 0x7FFF plus the lowest kept bit, drop the low 16 bits (NaN stays NaN)."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)
    else:
        return x.to(dtype)


@dataclass(frozen=True)
class Profile:
    name: str
    tile: int  # elements of a (pixels, channels) tile
    gather: int  # elements of the weight-gradient gather (taps, pixels, channels)
    channels: int  # widest channel block of the per-channel reductions
    programs: int  # programs a reduction aims for before it stops splitting the pixels


PROFILES = {
    "gpu": Profile("gpu", tile=4096, gather=4096, channels=64, programs=1024),
    "interpreter": Profile("interpreter", tile=1 << 20, gather=1 << 22, channels=1 << 12, programs=1),
}
_override: list = []


@contextlib.contextmanager
def use_profile(profile):
    """Run the kernels with the tiles of `profile` (a Profile, or "gpu" / "interpreter") inside the block."""
    _override.append(PROFILES[profile] if isinstance(profile, str) else profile)
    try:
        yield
    finally:
        _override.pop()


@triton.jit
def reduction_program(SPLITS, CBLOCKS, C, BLOCK_C: tl.constexpr):
    """This program of a per-(sample, channel) reduction (one program axis over sample x split x channel block):
    its sample n, its split s of the sample's pixels, the row ns = n * SPLITS + s of the partial sums, and its
    channels with their mask."""
    pid = tl.program_id(0)
    ns = pid // CBLOCKS
    c = (pid % CBLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    return ns // SPLITS, ns % SPLITS, ns, c, c < C


@triton.jit
def pixel_tile(P, HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of the flattened (P = N*H*W, C) activations (program axes: pixel block, channel block):
    element offsets, offsets into per-(sample, channel) vectors (N, C), the mask, and the channels."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < P)[:, None] & (c < C)[None, :]
    off = p.to(tl.int64)[:, None] * C + c[None, :]
    nc = (p // HW).to(tl.int64)[:, None] * C + c[None, :]
    return off, nc, mask, c


def profile() -> Profile:
    if _override:
        return _override[-1]
    return PROFILES["interpreter" if INTERPRETER else "gpu"]


def pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def warps(elements: int) -> int:
    """Warps of a program whose largest tensor has `elements` elements."""
    return 8 if elements >= 4096 else 4


def accumulator(dtype: torch.dtype):
    """Triton's accumulation type for `dtype`: float32, or float64 for float64 tensors (gradient checks)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch's statistics type for `dtype`: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Tiles:
    """(pixels, channels) tiles of a kernel over the flattened (N*H*W, C) activations, and its warps."""
    block_p: int
    block_c: int
    num_warps: int


def row_tiles(channels: int, pixels: int) -> Tiles:
    """Whole-row tiles: `block_p` pixels x every channel (padded to `block_c`), for kernels that need all the
    channels of a pixel at once (the LayerNorm)."""
    bc = pow2(channels)
    bp = max(1, min(profile().tile // bc, pow2(pixels)))
    return Tiles(bp, bc, warps(bp * bc))


def elementwise_tiles(channels: int, pixels: int, tile: int = 0) -> Tiles:
    """`tile` (elements) overrides the profile's tile size: a smaller tile for kernels that hold many loads in
    flight per element (the depthwise input gradient keeps a row of k taps)."""
    prof = profile()
    bc = min(pow2(channels), 128 if prof.name == "gpu" else pow2(channels))
    bp = max(1, min((min(tile, prof.tile) if tile else prof.tile) // bc, pow2(pixels)))
    return Tiles(bp, bc, warps(bp * bc))


@dataclass(frozen=True)
class Reduction:
    """Per-(sample, channel) sums over the pixels: programs over (sample, split, channel block), each looping
    over `tiles_per_split` tiles of `block_p` pixels of one sample; `splits` partial sums per sample are added
    by torch afterwards (in a fixed order)."""
    block_p: int
    block_c: int
    splits: int
    tiles_per_split: int
    channel_blocks: int
    num_warps: int


def reduction(samples: int, hw: int, channels: int, block_c: int = 0, tile: int = 0) -> Reduction:
    prof = profile()
    bc = block_c or min(pow2(channels), prof.channels)
    bp = max(1, min((tile or prof.tile) // bc, pow2(hw)))
    tiles = cdiv(hw, bp)
    cb = cdiv(channels, bc)
    splits = max(1, min(tiles, cdiv(prof.programs, max(1, samples * cb))))
    per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, per_split)  # no empty split
    return Reduction(bp, bc, splits, per_split, cb, warps(bp * bc))


def per_sample_sums(kernel, tensors: list, outputs: int, n: int, hw: int, c: int, acc) -> list:
    """Launch a per-(sample, channel) reduction `kernel(*tensors, *partials, HW, C, SPLITS, TILES_PER_SPLIT,
    CBLOCKS, BLOCK_P, BLOCK_C, ACC)` over N samples of hw pixels and c channels; its `outputs` partial sums
    (N, splits, C), in the statistics dtype of tensors[0], are added over the splits by torch: `outputs` (N, C)."""
    red = reduction(n, hw, c)
    parts = [tensors[0].new_empty((n, red.splits, c), dtype=stat_dtype(tensors[0].dtype)) for _ in range(outputs)]
    if n * hw:
        kernel[(n * red.splits * red.channel_blocks,)](
            *tensors, *parts, hw, c, red.splits, red.tiles_per_split, red.channel_blocks,
            BLOCK_P=red.block_p, BLOCK_C=red.block_c, ACC=acc, num_warps=red.num_warps)
    else:
        for t in parts:
            t.zero_()
    return [t.sum(1) for t in parts]


def elementwise(kernel, tensors: list, out: torch.Tensor, p: int, hw: int, c: int, acc) -> torch.Tensor:
    """Launch an elementwise `kernel(*tensors, out, P, HW, C, BLOCK_P, BLOCK_C, ACC)` over p pixels x c channels
    (programs over pixel blocks x channel blocks, `pixel_tile`); returns `out`."""
    tiles = elementwise_tiles(c, p)
    if p:
        kernel[(cdiv(p, tiles.block_p), cdiv(c, tiles.block_c))](
            *tensors, out, p, hw, c, BLOCK_P=tiles.block_p, BLOCK_C=tiles.block_c, ACC=acc,
            num_warps=tiles.num_warps)
    return out

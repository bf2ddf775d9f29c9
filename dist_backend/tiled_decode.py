"""VAE decode in tiles: diffusers' own tiling (`enable_tiling`) as an option, and one image's tiles split over ranks.

Tiling is a choice per decode, like ComfyUI's separate "VAE Decode (Tiled)" node: `DecodeTiling` says off / on /
auto (the planner's memory estimate decides) and the tile size and overlap in pixels, which map onto each VAE's
own attributes. A tiled decode on one rank is diffusers' `tiled_decode` itself.

Split decode: the tiles of diffusers' tiled decode are independent (each decodes its latent window alone; the
causal 3-D VAE of Wan runs its frame cache per tile), and only the final blend mixes neighbours. So the tile list
is split over the ranks of a group, each decodes its share, the group's leader gathers them and blends exactly as
`tiled_decode` does. The result equals the one-process tiled decode (the same operations on the same windows).
Frames of the causal VAE are NOT independent (each frame reads the cache of the ones before), so they are never
split. Supported: AutoencoderKL (Flux) and AutoencoderKLWan (Wan 2.1 / 2.2); other VAEs (Qwen-Image's) decode
tiled on one rank.

The tile loops below follow diffusers 0.42.1's `AutoencoderKL.tiled_decode` and `AutoencoderKLWan.tiled_decode`
line by line (their decode and blend halves are one function there, so they cannot be called separately); the
tests compare against those functions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from .errors import ConfigError


class VaeTiling(str, enum.Enum):
    OFF = "off"  # decode each output whole (the plain pipeline's numerics)
    ON = "on"  # diffusers' tiled decode whenever the output is larger than one tile
    AUTO = "auto"  # tiles only when the planner's estimate of the whole decode does not fit the device


@dataclass(frozen=True, kw_only=True)
class DecodeTiling:
    """How a decode uses tiles. Sizes in output pixels; 0 = the VAE's diffusers default (Flux: 1024 / 256, from its
    sample_size and overlap factor 0.25; Wan: 256 / 64)."""

    mode: VaeTiling = VaeTiling.OFF
    tile_size: int = 0
    """Pixels per side of a tile (ComfyUI's VAE Decode (Tiled) `tile_size`)."""
    overlap: int = 0
    """Pixels neighbouring tiles share and blend over (ComfyUI's `overlap`); 0 = a quarter of the tile (the VAEs'
    default ratio)."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", VaeTiling(getattr(self.mode, "value", self.mode)))
        except ValueError:
            raise ConfigError(f"vae_tiling={self.mode!r} is not one of: off, on, auto") from None
        for name in ("tile_size", "overlap"):
            value = getattr(self, name)
            if type(value) is not int or value < 0 or value % 8:
                raise ConfigError(f"vae tile {name} must be 0 (the VAE's default) or a multiple of 8 pixels (the "
                                  f"VAE's scale factor), got {value!r}")
        if self.tile_size and self.tile_size < 64:
            raise ConfigError(f"vae tile_size {self.tile_size} is below 64 pixels (8 latent pixels)")
        if self.tile_size and self.overlap and 2 * self.overlap >= self.tile_size:
            raise ConfigError(f"vae tile overlap {self.overlap} must be less than half the tile size "
                              f"({self.tile_size} / 2 = {self.tile_size // 2})")
        if self.tile_size and self.overlap:
            # AutoencoderKL takes the overlap as a float factor and diffusers truncates both products with int():
            # a factor that is not exact in binary (40 / 200) makes the tile stride one latent short of the crop.
            f = self.overlap / self.tile_size
            if int(self.tile_size // 8 * (1 - f)) * 8 != self.tile_size - self.overlap or \
                    int(self.tile_size * f) != self.overlap:
                raise ConfigError(f"vae tile overlap {self.overlap} / tile_size {self.tile_size} = {f} is not exact "
                                  "in binary, which diffusers' tiled decode needs; use a power-of-two share such as "
                                  f"{self.tile_size // 4} or {self.tile_size // 8}")
        if self.overlap and not self.tile_size:
            raise ConfigError(f"vae tile overlap {self.overlap} needs a tile_size too (the defaults differ per VAE)")

    def to_message(self) -> dict:
        return {"mode": self.mode.value, "tile_size": self.tile_size, "overlap": self.overlap}

    @classmethod
    def from_message(cls, message: dict | None) -> "DecodeTiling":
        return cls(**message) if message else cls()


def apply(vae, tiling: DecodeTiling) -> None:
    """Set diffusers' tiling on `vae` for this decode (ON only; AUTO is resolved on the host before). The VAE's own
    defaults are remembered at the first call so that a later decode with size 0 gets them back."""
    if tiling.mode is VaeTiling.AUTO:
        raise AssertionError("AUTO tiling reaches a rank unresolved")
    names = ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor") if _is_kl(vae) else (
        "tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height", "tile_sample_stride_width")
    if not hasattr(vae, "_distdiff_tile_defaults"):
        vae._distdiff_tile_defaults = {n: getattr(vae, n) for n in names}
    for name, value in vae._distdiff_tile_defaults.items():
        setattr(vae, name, value)
    if tiling.mode is VaeTiling.OFF:
        vae.disable_tiling()
        return
    vae.enable_tiling()
    if tiling.tile_size:
        t = tiling.tile_size
        if _is_kl(vae):
            vae.tile_sample_min_size = t
            vae.tile_latent_min_size = t // (2 ** (len(vae.config.block_out_channels) - 1))
            if tiling.overlap:
                vae.tile_overlap_factor = tiling.overlap / t
        else:
            stride = t - (tiling.overlap or t // 4)
            vae.enable_tiling(tile_sample_min_height=t, tile_sample_min_width=t, tile_sample_stride_height=stride,
                              tile_sample_stride_width=stride)


def _is_kl(vae) -> bool:
    return hasattr(vae, "tile_latent_min_size")


def splittable(vae) -> bool:
    """Whether this VAE's tiled decode can be split over ranks here (see the module docstring)."""
    from diffusers import AutoencoderKL, AutoencoderKLWan

    return type(vae) in (AutoencoderKL, AutoencoderKLWan)


def uses_tiles(vae, z: torch.Tensor) -> bool:
    """The condition of the VAE's own `_decode` for taking the tiled path."""
    if not vae.use_tiling:
        return False
    if _is_kl(vae):
        return z.shape[-1] > vae.tile_latent_min_size or z.shape[-2] > vae.tile_latent_min_size
    s = vae.spatial_compression_ratio
    return z.shape[-1] > vae.tile_sample_min_width // s or z.shape[-2] > vae.tile_sample_min_height // s


# -- the two halves of diffusers' tiled_decode ------------------------------------------------------------------

def tile_origins(vae, z: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Rows of (i, j) latent origins, in diffusers' loop order."""
    if _is_kl(vae):
        step_h = step_w = int(vae.tile_latent_min_size * (1 - vae.tile_overlap_factor))
    else:
        s = vae.spatial_compression_ratio
        step_h, step_w = vae.tile_sample_stride_height // s, vae.tile_sample_stride_width // s
    return [[(i, j) for j in range(0, z.shape[-1], step_w)] for i in range(0, z.shape[-2], step_h)]


def decode_tile(vae, z: torch.Tensor, origin: tuple[int, int]) -> torch.Tensor:
    """One tile's decoded pixels (before blending), as diffusers' tiled_decode computes it."""
    i, j = origin
    if _is_kl(vae):
        n = vae.tile_latent_min_size
        tile = z[:, :, i:i + n, j:j + n]
        if vae.config.use_post_quant_conv:
            tile = vae.post_quant_conv(tile)
        return vae.decoder(tile)
    s = vae.spatial_compression_ratio
    h, w = vae.tile_sample_min_height // s, vae.tile_sample_min_width // s
    vae.clear_cache()
    frames = []
    for k in range(z.shape[2]):  # frames in order: the causal cache carries each into the next
        vae._conv_idx = [0]
        tile = vae.post_quant_conv(z[:, :, k:k + 1, i:i + h, j:j + w])
        frames.append(vae.decoder(tile, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(k == 0)))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def blend(vae, z: torch.Tensor, rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """The decoded tiles (rows as from `tile_origins`) blended into the output, as diffusers' tiled_decode does."""
    if _is_kl(vae):
        blend_h = blend_w = int(vae.tile_sample_min_size * vae.tile_overlap_factor)
        keep_h = keep_w = vae.tile_sample_min_size - blend_h
    else:
        p = vae.config.patch_size or 1
        keep_h, keep_w = vae.tile_sample_stride_height // p, vae.tile_sample_stride_width // p
        blend_h, blend_w = vae.tile_sample_min_height // p - keep_h, vae.tile_sample_min_width // p - keep_w
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend_h)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend_w)
            out_row.append(tile[..., :keep_h, :keep_w])
        out_rows.append(torch.cat(out_row, dim=-1))
    dec = torch.cat(out_rows, dim=-2)
    if _is_kl(vae):
        return dec
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    s, p = vae.spatial_compression_ratio, vae.config.patch_size or 1
    dec = dec[..., :z.shape[-2] * s // p, :z.shape[-1] * s // p]
    if vae.config.patch_size is not None:
        dec = unpatchify(dec, patch_size=vae.config.patch_size)
    return torch.clamp(dec, min=-1.0, max=1.0)


# -- split over ranks -------------------------------------------------------------------------------------------

def split_decode(vae, z: torch.Tensor, *, group, index: int, size: int, leader: int) -> torch.Tensor | None:
    """The tiled decode of one output `z` ([1, C, ...] latents on this rank's device) with its tiles split over the
    `size` ranks of `group` (this rank is number `index` in it; `leader` is the group's first rank, global number).
    Returns the VAE's output on the leader, None elsewhere.

    NOTE: collectives: every rank of the group must call this with the same `z` shape and tiling (the host sends
    the group one latent and one tiling), so every rank computes the same tile list and the same shapes and takes
    part in the same two collectives. A rank that dies or hangs is found by the host's heartbeat / call deadline
    (config.heartbeat_timeout_s, call_timeout_s); the process group's own timeout bounds the wait on the others."""
    import torch.distributed as dist

    from .split import block_bounds

    rows = tile_origins(vae, z)
    flat = [o for row in rows for o in row]
    start, stop = block_bounds(len(flat), size, index)
    mine = [decode_tile(vae, z, o) for o in flat[start:stop]]
    # 1) Shapes: edge tiles are smaller, and only the decoder knows its output shape. Fixed-size int tensors, so the
    #    gather needs no padding: per rank ceil(n / size) slots of (ndim) sizes, unused slots zero.
    per_rank, ndim = math.ceil(len(flat) / size), z.dim()
    shapes = torch.zeros(per_rank, ndim, dtype=torch.int64, device=z.device)
    for k, t in enumerate(mine):
        shapes[k] = torch.tensor(t.shape, dtype=torch.int64)
    all_shapes = [torch.empty_like(shapes) for _ in range(size)]
    dist.all_gather(all_shapes, shapes, group=group)
    counts = [block_bounds(len(flat), size, r) for r in range(size)]
    sizes = [[math.prod(s.tolist()) for s in all_shapes[r][:b - a]] for r, (a, b) in enumerate(counts)]
    # 2) Pixels: one flat buffer per rank, padded to the longest (gloo gathers equal sizes only).
    longest = max(sum(s) for s in sizes)
    dtype = mine[0].dtype if mine else vae.dtype
    buffer = torch.zeros(longest, dtype=dtype, device=z.device)
    if mine:
        packed = torch.cat([t.reshape(-1) for t in mine])
        buffer[:packed.numel()] = packed
    gathered = [torch.empty_like(buffer) for _ in range(size)] if index == 0 else None
    dist.gather(buffer, gathered, dst=leader, group=group)
    if index != 0:
        return None
    tiles = []
    for r in range(size):
        offset = 0
        for k, n in enumerate(sizes[r]):
            tiles.append(gathered[r][offset:offset + n].reshape(all_shapes[r][k].tolist()))
            offset += n
    it = iter(tiles)
    return blend(vae, z, [[next(it) for _ in row] for row in rows])

"""What a plan is about and what it is: the request, the settings given by hand, the frozen `Plan` with its
reasons, and how a plan becomes `SessionConfig` keyword arguments. Plain data; `planner.plan` makes plans."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields

from ..config import Offload
from ..errors import ConfigError

class WeightStorage(str, enum.Enum):
    """How the denoising transformer's weights are stored on the GPU."""

    BF16 = "bf16"
    FP8 = "fp8"  # diffusers' layerwise casting: stored in float8, computed in bf16 (changes numerics slightly)


@dataclass(frozen=True, kw_only=True)
class Request:
    """What one call asks for (the sizes the plan must fit)."""

    height: int = 1024
    width: int = 1024
    frames: int = 1
    """Frames of a video (Wan: 4k + 1); 1 for images."""
    images: int = 1
    """Images (videos) in the call: prompts × images per prompt."""
    guidance: float = 3.5
    negative_prompt: str | None = None
    """None (or "") = none; any other text is a negative prompt (Qwen-Image's " " is one)."""
    true_cfg: float = 1.0
    """Flux's true CFG scale (`true_cfg_scale`): > 1 with a negative prompt runs two passes per step; other
    families take their CFG from `guidance` and leave this at 1."""
    steps: int = 28

    def __post_init__(self) -> None:
        if self.negative_prompt == "":
            object.__setattr__(self, "negative_prompt", None)  # the engine's rule: only "" means none
        for name in ("height", "width", "frames", "images", "steps"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Hand:
    """Settings given by hand; None = the planner chooses."""

    dp: int | None = None
    cfg: int | None = None
    ring: int | None = None
    ulysses: int | None = None
    gpus_per_rank: int | None = None
    offload: Offload | None = None
    weights: WeightStorage | None = None

    def __post_init__(self) -> None:
        if self.offload is not None:
            object.__setattr__(self, "offload", Offload(getattr(self.offload, "value", self.offload)))
        if self.weights is not None:
            object.__setattr__(self, "weights", WeightStorage(getattr(self.weights, "value", self.weights)))
        for name in ("dp", "cfg", "ring", "ulysses", "gpus_per_rank"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ConfigError(f"{name} must be an integer ≥ 1 (or left to the planner), got {value!r}")

    def given(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A layout the engine can run, with its predicted cost and the reasons for it in plain sentences."""

    dp: int
    cfg: int
    """2: the positive and negative CFG branches run on different ranks at the same time."""
    ring: int
    ulysses: int
    gpus_per_rank: int
    offload: Offload
    weights: WeightStorage
    vae_tiling: bool
    """The VAE decode of one output would not fit whole: decode in tiles (diffusers' enable_tiling)."""
    gpus: int
    memory_used: int
    """Bytes on the fullest GPU at the stage that needs the most (weights + activations + reserve)."""
    memory_budget: int
    """Bytes of each GPU."""
    step_seconds: float
    """Predicted seconds of one denoise step of the whole call (every image, both CFG branches)."""
    single_gpu_step_seconds: float
    """The same on one GPU of this kind, whether or not the model fits on it."""
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    hand_set: tuple[str, ...] = ()
    """Names of the settings that were given by hand."""

    @property
    def world_size(self) -> int:
        """Rank processes: dp × cfg × ring × ulysses."""
        return self.dp * self.cfg * self.ring * self.ulysses

    @property
    def speedup(self) -> float:
        return self.single_gpu_step_seconds / self.step_seconds

    @property
    def strategy(self) -> str:
        return strategy_name(self)

    def describe(self) -> str:
        """The plan as text: one line of degrees, then the reasons, then any warnings."""
        head = (f"plan: {self.strategy} on {self.gpus} GPU{'s' if self.gpus > 1 else ''} ({self.world_size} "
                f"rank{'s' if self.world_size > 1 else ''}), {self.offload.value}, {self.weights.value} weights"
                + (", VAE tiling" if self.vae_tiling else ""))
        lines = [head, *(f"  - {r}" for r in self.reasons), *(f"  ! {w}" for w in self.warnings)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(offload=self.offload.value, weights=self.weights.value, world_size=self.world_size,
                    strategy=self.strategy, speedup=round(self.speedup, 3), reasons=list(self.reasons),
                    warnings=list(self.warnings), hand_set=list(self.hand_set))
        return data


def strategy_name(layout) -> str:
    """"dp2×ulysses4"-style name of a layout (SessionConfig.strategy's form, plus cfg)."""
    parts = [f"{n}{d}" for n, d in (("dp", layout.dp), ("cfg", layout.cfg), ("ring", layout.ring),
                                     ("ulysses", layout.ulysses), ("device_map", layout.gpus_per_rank)) if d > 1]
    return "×".join(parts) or "single"


def decode_tiling(plan: Plan):
    """The `tiled_decode.DecodeTiling` that runs `plan`'s decode: tiles of `costs.VAE_TILE` pixels (the size its
    memory estimate assumed) blending over a quarter of a tile (diffusers' default ratio), or none."""
    from ..tiled_decode import DecodeTiling, VaeTiling
    from .costs import VAE_TILE

    if not plan.vae_tiling:
        return DecodeTiling(mode=VaeTiling.OFF)
    return DecodeTiling(mode=VaeTiling.ON, tile_size=VAE_TILE, overlap=VAE_TILE // 4)


def session_kwargs(plan: Plan, *, device: str = "cuda", dtype: str = "bfloat16",
                   config_fields: set[str] | None = None) -> dict[str, object]:
    """Keyword arguments for `SessionConfig` that run `plan` (on CUDA in bf16 unless told otherwise). Settings the
    plan needs but `SessionConfig` does not have yet (the `cfg` degree, fp8 storage) raise ConfigError instead of
    being dropped silently; `config_fields` defaults to SessionConfig's own fields."""
    if config_fields is None:
        from ..config import SessionConfig

        config_fields = {f.name for f in fields(SessionConfig)}
    kwargs: dict[str, object] = {
        "world_size": plan.world_size, "dp": plan.dp, "ring": plan.ring, "ulysses": plan.ulysses,
        "gpus_per_rank": plan.gpus_per_rank, "offload": plan.offload.value, "device": device, "dtype": dtype,
    }
    if plan.gpus_per_rank > 1:
        kwargs["device_map"] = "balanced"
    if plan.cfg > 1:
        kwargs["cfg"] = plan.cfg
    if plan.weights is WeightStorage.FP8:
        kwargs["weight_storage"] = plan.weights.value
    missing = sorted(k for k in kwargs if k not in config_fields)
    if missing:
        raise ConfigError(f"the plan needs {', '.join(f'{k}={kwargs[k]!r}' for k in missing)}, which this engine's "
                          "SessionConfig does not offer yet; set the degrees by hand without it (e.g. weights "
                          "'bf16', cfg 1) or add GPUs")
    return kwargs



# -- the planner's candidates ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One layout the planner considers: degrees, offload and weight storage."""

    dp: int
    cfg: int
    ring: int
    ulysses: int
    gpus_per_rank: int
    offload: Offload
    weights: WeightStorage

    @property
    def cp(self) -> int:
        return self.ring * self.ulysses


@dataclass(frozen=True)
class Costed:
    """A candidate that runs and fits, with its predicted seconds per step (the whole call) by cause."""

    layout: Candidate
    step: float
    compute: float
    communication: float
    floor: float
    memory: int
    tiling: bool
    reload: float
    idle: int
    """Data-parallel groups without an image."""

    @property
    def total(self) -> float:
        return self.step + self.reload

    @property
    def simplicity(self) -> tuple:
        lay = self.layout
        return (lay.weights is WeightStorage.FP8, self.idle, lay.offload is Offload.STAGED, lay.gpus_per_rank,
                lay.ring, lay.ulysses, lay.cfg)


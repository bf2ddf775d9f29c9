"""The one frozen, validated configuration of a sidecar. Invalid combinations raise ConfigError here, before any
process starts, with the arithmetic in the message."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


class Device(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class DType(str, enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Offload(str, enum.Enum):
    RESIDENT = "resident"  # every component stays loaded between calls
    STAGED = "staged"  # text encoders freed after encode, transformer after denoise (the guide's staged load/free)


class Compile(str, enum.Enum):
    NONE = "none"  # eager
    REGIONAL = "regional"  # torch.compile of the transformer's repeated block (diffusers' compile_repeated_blocks)


class CacheMode(str, enum.Enum):
    """diffusers' step caches (dist_backend/strategies/step_cache.py)."""

    NONE = "none"
    FIRST_BLOCK = "first_block"  # skip the other blocks when the first block's residual changed < threshold
    TAYLORSEER = "taylorseer"  # predict block outputs by Taylor expansion between full steps (fixed schedule)
    MAGCACHE = "magcache"  # skip by precomputed magnitude ratios (Flux only: diffusers ships its ratios)


class DeviceMapPolicy(str, enum.Enum):
    NONE = "none"  # each component whole on the rank's first device
    BALANCED = "balanced"  # components spread over the rank's GPUs; transformer split by accelerate ("auto")
    AUTO = "auto"  # like balanced, but fill GPUs in order


class WireEnum(str, enum.Enum):
    """A closed set of names that cross process boundaries (message kinds, events, CP modes): a member is written as
    its plain string (JSON writes a str subclass as its text), compares and hashes equal to it and prints as it, so
    the wire format is the string and what arrives on the other side is a plain str."""

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


def _enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"{name}={value!r} is not one of: {choices}") from None


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """Everything that decides which rank processes exist and how they hold the model.
    Two equal configs share one sidecar; a different config replaces it."""

    world_size: int = 1
    """Number of rank processes."""
    dp: int = 0
    """Data-parallel degree: independent groups that split images between them. 0 = world_size / (cfg × ring × ulysses)."""
    cfg: int = 1
    """CFG-parallel degree (1 or 2): with 2, each data-parallel group has two halves that compute the conditional and
    the unconditional branch of every step at the same time (calls without classifier-free guidance are refused)."""
    ring: int = 1
    """Ring-attention degree inside each data-parallel group (diffusers ContextParallelConfig.ring_degree)."""
    ulysses: int = 1
    """Ulysses-attention degree inside each data-parallel group (ContextParallelConfig.ulysses_degree)."""
    gpus_per_rank: int = 1
    """GPUs owned by each rank; >1 shards components over them with device_map (CUDA only)."""
    device: Device = Device.CPU
    """"cuda" (NCCL between ranks) or "cpu" (gloo)."""
    gpu_ids: tuple[int, ...] = ()
    """The CUDA devices the ranks use (the `gpus` input, `--gpus 0,1`; a "0,1,2,3" string is read too), in rank order:
    rank r gets ids r·g … r·g + g − 1 of the list, g = gpus_per_rank. Exactly world_size × gpus_per_rank distinct
    indices ≥ 0, as this process's torch numbers them (after its CUDA_VISIBLE_DEVICES). Empty = 0 … world_size ×
    gpus_per_rank − 1. Lets a user keep a GPU (ComfyUI's own) free."""
    device_map: DeviceMapPolicy = DeviceMapPolicy.NONE
    """How components are placed over a rank's GPUs when gpus_per_rank > 1."""
    max_memory: str = ""
    """Per-GPU budget for device_map placement, e.g. "0=16GB,1=16GB" (local GPU index within the rank)."""
    dtype: DType = DType.FLOAT32
    """Weights and compute dtype."""
    attention_backend: str = ""
    """diffusers attention backend name ("" = native SDPA; e.g. "flash", "_native_cudnn" on CUDA)."""
    offload: Offload = Offload.RESIDENT
    """Keep every component resident, or free them stage by stage."""
    compile: Compile = Compile.NONE
    """"regional": torch.compile the transformer's repeated block once (after CP is enabled), kept across calls;
    the first call of a new size pays the compile (see docs/PERFORMANCE.md for what triggers one)."""
    cache: CacheMode = CacheMode.NONE
    """Step caching through diffusers' cache hooks; trades exactness for speed (see docs/PERFORMANCE.md)."""
    cache_threshold: float = 0.0
    """first_block / magcache threshold; 0 = diffusers' default (0.05 / 0.06). Higher skips more."""
    threads_per_rank: int = 0
    """torch CPU threads per rank; 0 = cores / world_size (at least 1)."""
    host: str = "127.0.0.1"
    """Address the host's control channel binds to; keep loopback unless ranks run on other machines."""
    start_timeout_s: float = 120.0
    """Deadline for every rank to start, join the process group and report ready."""
    call_timeout_s: float = 3600.0
    """Deadline for one whole call (load, encode, denoise or decode)."""
    heartbeat_timeout_s: float = 120.0
    """Longest silence allowed from a rank inside a call before it counts as stopped (every rank beats from a thread
    a few times per this period in every stage, however long a load takes), and, in a denoise, the longest time
    between two steps outside a weights load before it counts as hung. Also the deadline of every host-side send."""
    max_frame_bytes: int = 0
    """Largest message the host accepts from a rank. 0 = sized per call from the largest result it can produce
    (images of a decode, latents of a denoise, embeddings of an encode) plus 16 MiB for control messages."""
    env: tuple[tuple[str, str], ...] = field(default=())
    """Extra environment variables for the rank processes."""

    def __post_init__(self) -> None:
        for name, cls in (("device", Device), ("dtype", DType), ("offload", Offload), ("device_map", DeviceMapPolicy),
                          ("compile", Compile), ("cache", CacheMode)):
            object.__setattr__(self, name, _enum(cls, getattr(self, name), name))
        object.__setattr__(self, "gpu_ids", parse_gpu_ids(self.gpu_ids))
        object.__setattr__(self, "env", tuple((str(k), str(v)) for k, v in self.env))
        for name in ("world_size", "cfg", "ring", "ulysses", "gpus_per_rank"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
        if type(self.dp) is not int or self.dp < 0:
            raise ConfigError(f"dp must be an integer ≥ 0 (0 = derive from world_size), got {self.dp!r}")
        if self.cfg not in (1, 2):
            raise ConfigError(f"cfg must be 1 or 2 (a step has two guidance branches: conditional and "
                              f"unconditional), got {self.cfg}")
        cp = self.ring * self.ulysses
        group = self.cfg * cp
        if self.dp == 0:
            if self.world_size % group:
                raise ConfigError(
                    f"world_size ({self.world_size}) is not divisible by cfg ({self.cfg}) × ring ({self.ring}) × "
                    f"ulysses ({self.ulysses}) = {group}; pick degrees whose product divides the number of ranks"
                )
            object.__setattr__(self, "dp", self.world_size // group)
        if self.dp * group != self.world_size:
            raise ConfigError(
                f"dp ({self.dp}) × cfg ({self.cfg}) × ring ({self.ring}) × ulysses ({self.ulysses}) = "
                f"{self.dp * group}, but world_size is {self.world_size}; make the product equal the number of ranks"
            )
        if self.device is Device.CPU:
            if self.gpus_per_rank != 1:
                raise ConfigError(f"gpus_per_rank={self.gpus_per_rank} needs device='cuda'; on CPU each rank is one process")
            if self.gpu_ids:
                raise ConfigError(f"gpus={_ids(self.gpu_ids)} picks CUDA devices, but device is 'cpu': use device='cuda', "
                                  "or leave gpus empty")
            if self.dtype is DType.FLOAT16:
                raise ConfigError("dtype='float16' is not supported on device='cpu' (slow or missing CPU kernels); "
                                  "use 'bfloat16' or 'float32'")
        else:
            need = self.world_size * self.gpus_per_rank
            if len(set(self.gpu_ids)) != len(self.gpu_ids):
                twice = sorted({g for g in self.gpu_ids if self.gpu_ids.count(g) > 1})
                raise ConfigError(f"gpus={_ids(self.gpu_ids)} names GPU {_ids(twice)} more than once; each rank needs GPUs "
                                  "of its own (NCCL runs one rank per GPU): list distinct GPUs")
            if self.gpu_ids and len(self.gpu_ids) != need:
                per = self.gpus_per_rank
                fix = f"list {need} GPUs"
                if len(self.gpu_ids) % per == 0:
                    fix += f", or set world_size (ranks) to {len(self.gpu_ids) // per} to use all {len(self.gpu_ids)}"
                raise ConfigError(
                    f"gpus={_ids(self.gpu_ids)} lists {len(self.gpu_ids)} GPUs, but world_size ({self.world_size}) × "
                    f"gpus_per_rank ({per}) = {need} GPUs are used: {fix}"
                )
        if self.gpus_per_rank > 1 and cp > 1:
            raise ConfigError(
                f"gpus_per_rank={self.gpus_per_rank} with ring × ulysses = {cp}: context parallelism needs each rank's "
                "transformer on one GPU. Use gpus_per_rank=1 for CP, or ring=ulysses=1 to shard with device_map"
            )
        if self.device is Device.CUDA and self.ring > 1 and self.attention_backend in ("", "native"):
            # Ring merges partial attention by its log-sum-exp; diffusers' native (SDPA) backend cannot return it
            # and would fail at the first forward. cuDNN attention returns it, for bf16/fp16 only.
            if self.attention_backend == "native" or self.dtype is DType.FLOAT32:
                raise ConfigError(
                    f"ring={self.ring} on CUDA needs an attention backend that returns the log-sum-exp, and "
                    f"attention_backend={self.attention_backend or 'default'!r} with dtype={self.dtype.value!r} has "
                    "none: use dtype='bfloat16' (cuDNN attention is then chosen), attention_backend='flash' "
                    "(flash-attn installed), or ulysses instead of ring"
                )
            object.__setattr__(self, "attention_backend", "_native_cudnn")
        if self.max_memory and self.gpus_per_rank == 1 and self.device_map is DeviceMapPolicy.NONE:
            raise ConfigError("max_memory is only used with device_map='balanced' or 'auto'; set device_map too")
        for name in ("start_timeout_s", "call_timeout_s", "heartbeat_timeout_s"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        if not isinstance(self.cache_threshold, (int, float)) or self.cache_threshold < 0:
            raise ConfigError(f"cache_threshold must be ≥ 0 (0 = diffusers' default), got {self.cache_threshold!r}")
        if self.cache is CacheMode.TAYLORSEER and self.cache_threshold:
            raise ConfigError("cache='taylorseer' has no threshold (it computes every 5th step after 3 warm-up steps, "
                              "diffusers' defaults); leave cache_threshold at 0")
        if self.cache is CacheMode.NONE and self.cache_threshold:
            raise ConfigError(f"cache_threshold={self.cache_threshold} needs a cache; set cache='first_block' or "
                              "'magcache'")
        if self.cache is not CacheMode.NONE and self.compile is Compile.REGIONAL:
            raise ConfigError(f"cache={self.cache.value!r} with compile='regional' is not supported yet (not proven "
                              "equal to one process); use one of them")
        if type(self.max_frame_bytes) is not int or self.max_frame_bytes < 0:
            raise ConfigError(f"max_frame_bytes must be an integer ≥ 0 (0 = sized per call), got {self.max_frame_bytes!r}")
        if self.threads_per_rank < 0:
            raise ConfigError(f"threads_per_rank must be ≥ 0 (0 = automatic), got {self.threads_per_rank}")

    # -- derived --------------------------------------------------------------------------------------------
    @property
    def cp_degree(self) -> int:
        return self.ring * self.ulysses

    @property
    def group_size(self) -> int:
        """Ranks per data-parallel group: cfg × ring × ulysses (they compute one image together)."""
        return self.cfg * self.ring * self.ulysses

    @property
    def strategy(self) -> str:
        """Human-readable name, e.g. "dp2×ulysses2"."""
        parts = [f"{n}{d}" for n, d in (("dp", self.dp), ("cfg", self.cfg), ("ring", self.ring),
                                        ("ulysses", self.ulysses)) if d > 1]
        if self.gpus_per_rank > 1:
            parts.append(f"device_map{self.gpus_per_rank}")
        return "×".join(parts) or "single"

    def rank_gpus(self, rank: int) -> tuple[int, ...]:
        """CUDA indices owned by `rank` (empty on CPU)."""
        if self.device is Device.CPU:
            return ()
        ids = self.gpu_ids or tuple(range(self.world_size * self.gpus_per_rank))
        return ids[rank * self.gpus_per_rank:(rank + 1) * self.gpus_per_rank]

    def rank_threads(self) -> int:
        if self.threads_per_rank:
            return self.threads_per_rank
        return max(1, (os.cpu_count() or 1) // self.world_size)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, enum.Enum):
                data[key] = value.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SessionConfig":
        data = json.loads(text)
        data["gpu_ids"] = tuple(data.get("gpu_ids", ()))
        data["env"] = tuple(tuple(kv) for kv in data.get("env", ()))
        return cls(**data)


def _ids(ids) -> str:
    return ",".join(str(g) for g in ids)


def parse_gpu_ids(value: Any, *, name: str = "gpus") -> tuple[int, ...]:
    """"0,1,2,3" (spaces allowed) or a sequence of ints -> (0, 1, 2, 3); "" -> () (the default devices). ConfigError
    naming `name` for anything that is not a list of CUDA indices ≥ 0."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    if isinstance(value, str) and not value.strip():
        return ()
    ids = []
    for part in parts:
        try:
            gid = part if type(part) is int else int(str(part), 10)
        except ValueError:
            gid = None
        if gid is None or gid < 0:
            raise ConfigError(f"{name}={value if isinstance(value, str) else _ids(parts)!r}: {part!r} is not a GPU "
                              "index; write CUDA device indices ≥ 0 separated by commas, e.g. '0,1' (empty = the "
                              "first world_size × gpus_per_rank GPUs)")
        ids.append(gid)
    return tuple(ids)


def check_devices(config: SessionConfig, *, local_ranks: int | None = None) -> None:
    """Checks that need the machine (not just the numbers): enough CUDA devices. Raises before any rank starts.
    `local_ranks`: how many of the ranks this machine starts (a cluster's head: its `local:N`); None = all."""
    if config.device is not Device.CUDA:
        return
    import torch

    check_device_count(config, count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                       local_ranks=local_ranks)
    if config.dtype is DType.BFLOAT16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype='bfloat16' is not supported by this GPU; use 'float16' or 'float32'")


def check_device_count(config: SessionConfig, *, count: int, local_ranks: int | None = None) -> None:
    """Enough of this machine's `count` CUDA devices for the ranks it starts. With a cluster only the head's own
    ranks count: each other machine's ranks use that machine's GPUs (join_rank gives them its local indices)."""
    if count == 0:
        raise ConfigError("device='cuda' but this machine has no usable CUDA device; use device='cpu'")
    ranks = config.world_size if local_ranks is None else local_ranks
    ids = tuple(g for rank in range(ranks) for g in config.rank_gpus(rank))
    if config.gpu_ids and max(ids) >= count:
        missing = _ids(g for g in ids if g >= count)
        raise ConfigError(f"gpus={_ids(ids)} names GPU {missing}, but this process sees {count} CUDA device(s), "
                          f"0–{count - 1}: list GPUs below {count}")
    if max(ids) < count:
        return
    need = ranks * config.gpus_per_rank
    if local_ranks is None:
        raise ConfigError(
            f"world_size ({config.world_size}) × gpus_per_rank ({config.gpus_per_rank}) = {need} GPUs "
            f"(ids {list(ids)}), but this machine has {count}; lower world_size or gpus_per_rank"
        )
    raise ConfigError(
        f"this machine's {ranks} of the {config.world_size} ranks (cluster `local:{ranks}`) × gpus_per_rank "
        f"({config.gpus_per_rank}) = {need} GPUs (ids {list(ids)}), but it has {count}; give `local` fewer ranks "
        "or lower gpus_per_rank"
    )

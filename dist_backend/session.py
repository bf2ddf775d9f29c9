"""The public engine API: a Session owns one sidecar and exposes the four stages (load, encode, denoise,
decode) that the ComfyUI nodes map onto one to one, plus `generate` that chains them.

Everything that can be checked on the host is checked before a rank is started or a call is sent.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cluster import ClusterConfig, read_token
from .config import SessionConfig, check_devices
from .driver import CancelFn, ProgressFn, Sidecar
from .errors import ConfigError
from .split import block_bounds, image_items

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conditioning:
    """Prompt embeddings on the host (CPU), one dict per prompt, in prompt order."""

    model_dir: str
    family: str
    prompts: tuple[str, ...]
    negative_prompt: str | None
    embeds: tuple[dict[str, torch.Tensor], ...]


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = round(self.stages.get(stage, 0.0) + seconds, 4)


class Session:
    """A sidecar for one SessionConfig. Starts ranks lazily on the first call and restarts them after a failure
    (re-loading the model it had), so one dead rank costs one failed call, not a broken session."""

    def __init__(self, config: SessionConfig, *, cluster: ClusterConfig | None = None) -> None:
        if cluster is not None:
            cluster.check(world_size=config.world_size, host=config.host)  # before any rank starts
            for group, hosts in cluster.spec.groups_across_nodes(config.cp_degree):
                log.warning("context-parallel ranks %s span nodes %s: their attention exchange crosses the network "
                            "every step; give each node a multiple of ring × ulysses = %d ranks and let dp span "
                            "the machines instead", group, hosts, config.cp_degree)
            read_token(cluster.token_file)  # exists, 0600, a token: refused now rather than at the first call
        self.config = config
        self.cluster = cluster
        self._sidecar: Sidecar | None = None
        self._model_dir: str | None = None
        self._model_info: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self.starts = 0
        self.timings = Timings()
        self.last_cp_modes: list[str | None] = []

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def sidecar(self) -> Sidecar:
        with self._lock:
            if self._sidecar is None or not self._sidecar.alive():
                if self._sidecar is not None:
                    self._sidecar.close()
                check_devices(self.config)
                t0 = time.monotonic()
                self._sidecar = Sidecar(self.config, cluster=self.cluster)
                self.starts += 1
                self.timings.add("start", time.monotonic() - t0)
                if self._model_dir is not None:
                    self._sidecar.call("load", self._same({"model_dir": self._model_dir}))
            return self._sidecar

    def alive(self) -> bool:
        return self._sidecar is not None and self._sidecar.alive()

    def sidecar_pids(self) -> list[int]:
        """Rank process ids of the live sidecar (empty when none is running)."""
        return self._sidecar.pids if self.alive() else []

    def close(self) -> None:
        with self._lock:
            if self._sidecar is not None:
                self._sidecar.close()
            self._sidecar = None

    def _same(self, payload: dict) -> list[dict]:
        return [payload] * self.config.world_size

    # -- stages ------------------------------------------------------------------------------------------------
    def load(self, model_dir: str | Path, *, should_cancel: CancelFn | None = None) -> dict[str, Any]:
        """Check the model folder on the host, then load it on every rank (components per the offload policy).
        A load cannot stop midway: cancelling it stops the ranks (see driver.CANCEL_GRACE_S)."""
        from .pipelines import read_model_config
        from .strategies.cp_checks import check_cp_supported

        model_dir = str(Path(model_dir).expanduser().resolve())
        info = read_model_config(model_dir)
        if self.config.cp_degree > 1:
            check_cp_supported(info, ring=self.config.ring, ulysses=self.config.ulysses)
        if self.config.gpus_per_rank > 1 and self.config.max_memory:
            # The placement is a pure function of the folder's configs and the budgets: refuse a plan that does
            # not fit before any rank starts (ranks without max_memory plan on their GPUs' free memory).
            from .pipelines import adapter_for
            from .sharding import plan_for_model
            from .strategies.placement import parse_max_memory

            plan_for_model(model_dir, config=self.config, adapter=adapter_for(info["family"]),
                           budgets=parse_max_memory(self.config.max_memory), models=set(info["models"]))
        with self._lock:
            sidecar = self.sidecar
            t0 = time.monotonic()
            if self._model_dir != model_dir:
                # The ranks drop the old model before loading the new one, so after any failure (or cancel) the
                # session holds no model: nothing half-loaded is ever used, and a restart does not reload it.
                self._model_dir = self._model_info = None
                sidecar.call("load", self._same({"model_dir": model_dir}), should_cancel=should_cancel)
                self._model_dir, self._model_info = model_dir, info
            self.timings.add("load", time.monotonic() - t0)
        return info

    def encode(self, prompts: list[str] | tuple[str, ...] | str, negative_prompt: str | None = None, *,
               should_cancel: CancelFn | None = None) -> Conditioning:
        """Prompts -> embeddings on the host. Prompts are split over all ranks in contiguous blocks."""
        prompts = _prompt_list(prompts)
        self._require_model()
        world = self.config.world_size
        payloads = []
        for rank in range(world):
            start, stop = block_bounds(len(prompts), world, rank)
            payloads.append({"prompts": prompts[start:stop], "negative_prompt": negative_prompt})
        with self._lock:
            t0 = time.monotonic()
            results = self.sidecar.call("encode", payloads, should_cancel=should_cancel)
            self.timings.add("encode", time.monotonic() - t0)
        # Copies: large embeddings view the ranks' shared arenas, which the next call may overwrite.
        embeds = tuple({k: v.clone() for k, v in e.items()} for r in results for e in r["embeds"])
        return Conditioning(model_dir=self._model_dir, family=self._model_info["family"], prompts=tuple(prompts),
                            negative_prompt=negative_prompt, embeds=embeds)

    def denoise(self, cond: Conditioning, *, seed: int, steps: int, guidance: float, height: int, width: int,
                images_per_prompt: int = 1, num_frames: int = 1, on_progress: ProgressFn | None = None,
                should_cancel: CancelFn | None = None) -> torch.Tensor:
        """Embeddings -> unpacked latents [B, C, h, w] (video [B, C, F, h, w]), B = prompts × images_per_prompt,
        prompt-major; image j is made with seed + j."""
        self._require_model()
        cp_lengths = self._check_denoise(cond, steps=steps, height=height, width=width,
                                         images_per_prompt=images_per_prompt, num_frames=num_frames, seed=seed)
        items = image_items(len(cond.prompts), images_per_prompt, seed)
        cfg = self.config
        payloads = []
        for rank in range(cfg.world_size):
            dp_index = rank // cfg.cp_degree
            start, stop = block_bounds(len(items), cfg.dp, dp_index)
            mine = items[start:stop]
            keys = sorted({p for p, _ in mine})
            payloads.append({
                "items": [[str(p), s] for p, s in mine],
                "cond": {str(p): cond.embeds[p] for p in keys},
                "steps": steps, "guidance": float(guidance), "height": height, "width": width,
                "num_frames": num_frames, "cp_lengths": cp_lengths,
            })
        with self._lock:
            t0 = time.monotonic()
            results = self.sidecar.call("denoise", payloads, on_progress=on_progress, should_cancel=should_cancel,
                                        stepped=True)
            self.timings.add("denoise", time.monotonic() - t0)
        self.last_cp_modes = [r["cp_mode"] for r in results]  # what each rank really ran (tests check it)
        latents = [lat for r in results if r["latents"] is not None for lat in r["latents"]]
        return torch.cat(latents, dim=0)

    def decode(self, latents: torch.Tensor, *, should_cancel: CancelFn | None = None) -> torch.Tensor:
        """Unpacked latents -> float32 images [B, H, W, 3] in 0..1 (video: B × F frames). Split over all ranks."""
        self._require_model()
        if not isinstance(latents, torch.Tensor) or latents.dim() not in (4, 5) or latents.shape[0] == 0:
            raise ConfigError(f"latents must be a [B, C, h, w] (or video [B, C, F, h, w]) tensor with B ≥ 1, got "
                              f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        latents = latents.detach().to("cpu", torch.float32).contiguous()
        world = self.config.world_size
        payloads = []
        for rank in range(world):
            start, stop = block_bounds(latents.shape[0], world, rank)
            payloads.append({"latents": latents[start:stop] if stop > start else None})  # encode copies it
        with self._lock:
            t0 = time.monotonic()
            results = self.sidecar.call("decode", payloads, should_cancel=should_cancel)
            self.timings.add("decode", time.monotonic() - t0)
        return torch.cat([r["images"] for r in results if r["images"] is not None], dim=0)

    def generate(self, *, model_dir: str | Path, prompts: list[str], negative_prompt: str | None = None, seed: int,
                 steps: int, guidance: float, height: int, width: int, images_per_prompt: int = 1,
                 num_frames: int = 1, on_progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All four stages. Returns (latents, images)."""
        from .pipelines import read_model_config

        # Everything knowable from the arguments and the folder's configs is refused before any rank starts.
        prompts = _prompt_list(prompts)
        check_request(read_model_config(model_dir), steps=steps, height=height, width=width,
                      images_per_prompt=images_per_prompt, num_frames=num_frames, seed=seed)
        self.load(model_dir, should_cancel=should_cancel)
        cond = self.encode(prompts, negative_prompt, should_cancel=should_cancel)
        latents = self.denoise(cond, seed=seed, steps=steps, guidance=guidance, height=height, width=width,
                               images_per_prompt=images_per_prompt, num_frames=num_frames,
                               on_progress=on_progress, should_cancel=should_cancel)
        images = self.decode(latents, should_cancel=should_cancel)
        return latents, images

    # -- checks --------------------------------------------------------------------------------------------------
    def _require_model(self) -> None:
        if self._model_dir is None:
            raise ConfigError("no model is loaded in this session; call load(model_dir) first")

    def _check_denoise(self, cond: Conditioning, *, steps, height, width, images_per_prompt, num_frames,
                       seed) -> dict[str, int]:
        """Refuse a bad request before any call; return every sequence length the CP plan will split in it, over
        all prompts ({} without CP). Every rank gets that same dict, so every rank picks the same CP mode (see
        RankEngine._set_cp_mode)."""
        from .pipelines import adapter_for
        from .strategies.cp_checks import check_sequences

        if not isinstance(cond, Conditioning) or not cond.embeds:
            raise ConfigError("conditioning is empty; encode at least one prompt first")
        if cond.model_dir != self._model_dir:
            raise ConfigError(f"conditioning was encoded for {cond.model_dir}, but this session has {self._model_dir} "
                              "loaded; encode the prompts again with this pipeline")
        check_request(self._model_info, steps=steps, height=height, width=width, images_per_prompt=images_per_prompt,
                      num_frames=num_frames, seed=seed)
        if self.config.cp_degree == 1:
            return {}
        adapter = adapter_for(self._model_info["family"])
        cp_lengths = {}
        for index, embeds in enumerate(cond.embeds):
            lengths = adapter.sequence_lengths(self._model_info, embeds, height=height, width=width,
                                               num_frames=num_frames)
            check_sequences(lengths, ring=self.config.ring, ulysses=self.config.ulysses,
                            uses_mask=adapter.uses_attention_mask(embeds), what=f"prompt {index}")
            cp_lengths.update({f"{name} tokens of prompt {index}": int(v) for name, v in lengths.items()})
        return cp_lengths


def _prompt_list(prompts: list[str] | tuple[str, ...] | str) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ConfigError("prompts is empty; give at least one prompt (one per line in the node)")
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError("every prompt must be a string")
    return prompts


def check_request(info: dict[str, Any], *, steps, height, width, images_per_prompt, num_frames, seed) -> None:
    """The denoise arguments against the model's configs (`pipelines.read_model_config`); needs no rank."""
    from .pipelines import adapter_for

    for name, value, low in (("steps", steps, 1), ("images_per_prompt", images_per_prompt, 1),
                             ("num_frames", num_frames, 1), ("height", height, 1), ("width", width, 1)):
        if type(value) is not int or value < low:
            raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if type(seed) is not int or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    adapter_for(info["family"]).check_size(info, height=height, width=width, num_frames=num_frames)


# -- one live sidecar per process ------------------------------------------------------------------------------
_current: Session | None = None
_registry_lock = threading.Lock()
_atexit_registered = False


def get_session(config: SessionConfig, *, cluster: ClusterConfig | None = None) -> Session:
    """The live session for `config` (and `cluster`, for ranks on other machines): reused when both are equal,
    replaced (old ranks stopped first, so their GPUs are free) when either differs."""
    global _current, _atexit_registered
    with _registry_lock:
        if _current is not None and (_current.config != config or _current.cluster != cluster):
            _current.close()
            _current = None
        if _current is None:
            _current = Session(config, cluster=cluster)
            if not _atexit_registered:
                atexit.register(shutdown_all)
                _atexit_registered = True
        return _current


def current_session() -> Session | None:
    return _current


def shutdown_all() -> None:
    """Stop the live sidecar (ComfyUI's release node and process exit call this)."""
    global _current
    with _registry_lock:
        if _current is not None:
            _current.close()
        _current = None

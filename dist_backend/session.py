"""The public engine API: a Session owns one sidecar and exposes the four stages (load, encode, denoise,
decode) that the ComfyUI nodes map onto one to one, plus `generate` that chains them.

Everything that can be checked on the host is checked before a rank is started or a call is sent.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cluster import ClusterConfig, read_token
from .config import SessionConfig, check_devices
from .driver import ABORT_GRACE_S, CancelFn, PreviewFn, ProgressFn, Sidecar
from .errors import Cancelled, ConfigError, SidecarError, UnsupportedError
from .files import ModelFiles
from .protocol import Op
from .split import block_bounds, image_items
from .status import RankStatus, SidecarState, StatusBoard, StatusSnapshot, failure_from, rank_statuses
from .tiled_decode import DecodeTiling

if TYPE_CHECKING:
    from .lora import LoraSpec

log = logging.getLogger(__name__)
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to 2^64 − 1
# How long Session.close waits for a running call to leave after asking it to stop, beyond ABORT_GRACE_S, before
# it stops the call's ranks from outside; and then how long for the call's thread to hand the session back.
_CLOSE_MARGIN_S = 2.0
_CLOSE_WAIT_S = 30.0
# Upper bounds of one rank's answer, per unit of work, that size the host's frame limit (driver.Sidecar.call).
EMBED_BYTES_PER_PROMPT = 64 * 1024**2  # prompt + negative embeddings of the largest text encoders, float32
LATENT_BYTES_PER_PIXEL = 4  # ≤ 64 float32 latent channels per 8×8 pixels
IMAGE_BYTES_PER_LATENT_PIXEL = 8 * 8 * 3 * 4 * 4  # 8×8 RGB float32 pixels, × 4 frames per latent frame (video VAEs)


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
        self._model_dir: str | None = None  # the folder path, or a ModelFiles' key
        self._model_info: dict[str, Any] | None = None
        self._loras: tuple = ()  # lora.LoraSpec, the set the ranks hold (None: unknown after a failed call)
        self._load_message: dict | None = None  # what "load" sends: {"model_dir": path} or {"files": ...}
        self._lock = threading.RLock()
        self._abort_reason: str | None = None  # set by close() from another thread while a call holds _lock
        self.starts = 0
        self.timings = Timings()
        self.status = StatusBoard()  # what a status panel shows (dist_backend/status.py)
        self._failed_rows: list[RankStatus] = []  # the rows of the sidecar that failed last (see _stage)
        self.last_cp_modes: list[str | None] = []
        # Per rank, under cfg = 2: {"forwards", "exchanges", "bytes_sent"} of the last denoise (None with cfg = 1).
        self.last_cfg_stats: list[dict[str, int] | None] = []
        self.last_graphs_compiled: list[int] = []  # per rank: graphs torch.compile built during the last denoise
        self.last_cache_stats: list[dict[str, int] | None] = []  # per rank: {"forwards", "skipped"} of the step cache
        self.last_run: dict[str, Any] = {}  # what the last denoise ran (CLI summary, status route)
        self.last_cp_models: list[list[str]] = []
        self.last_decode: dict[str, Any] = {}  # the last decode's tiling ("off"/"on") and whether it was split

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def sidecar(self) -> Sidecar:
        with self._lock:
            if self._sidecar is None or not self._sidecar.alive():
                if self._sidecar is not None:
                    self._sidecar.close()
                    self._sidecar = None  # a start that fails has no rows to show, not the last sidecar's
                check_devices(self.config, local_ranks=self.cluster.spec.local_ranks if self.cluster else None)
                with self._stage("start", state=SidecarState.STARTING):
                    t0 = time.monotonic()
                    self._sidecar = Sidecar(self.config, cluster=self.cluster)
                    self.starts += 1
                    self.timings.add("start", time.monotonic() - t0)
                    if self._abort_reason is not None:  # closed from another thread while the ranks started
                        self._sidecar.request_abort(self._abort_reason)
                    if self._load_message is not None:
                        self.status.set_state(SidecarState.LOADING)
                        self._sidecar.call(Op.LOAD, self._same(self._load_message))
                        if self._loras:
                            self._sidecar.call(Op.SET_LORAS,
                                               self._same({"loras": [s.to_message() for s in self._loras]}))
            return self._sidecar

    def alive(self) -> bool:
        return self._sidecar is not None and self._sidecar.alive()

    def sidecar_pids(self) -> list[int]:
        """Rank process ids of the live sidecar (empty when none is running)."""
        return self._sidecar.pids if self.alive() else []

    def rank_statuses(self) -> list[RankStatus]:
        """One row per rank of the live sidecar for a status panel: stage, its own step, CUDA memory (empty when
        none is running). Cheap and safe from any thread, also while a call runs."""
        sidecar = self._sidecar
        if sidecar is None or not sidecar.alive():
            return list(self._failed_rows) if self.status.snapshot.state is SidecarState.FAILED else []
        return rank_statuses(self.status.snapshot, places=sidecar.rank_places, steps=dict(sidecar.rank_steps),
                             gpu_memory=dict(sidecar.rank_gpu_memory), rss=dict(sidecar.rank_rss))

    def close(self, *, reason: str = "the sidecar was released") -> None:
        """Stop the sidecar (the next call starts a fresh one and reloads the model). Safe from any thread, also
        while a call runs on another one: that call is asked to stop (its ranks leave at the next step boundary,
        it raises Cancelled(reason)); if it has not let go of the session within ABORT_GRACE_S + a margin, its
        ranks are killed under it. Blocks for that long at most: never call it on an event loop (the ComfyUI
        routes run it on a worker thread)."""
        self._abort_reason = reason
        sidecar = self._sidecar
        if sidecar is not None:
            sidecar.request_abort(reason)
        got = self._lock.acquire(timeout=ABORT_GRACE_S + _CLOSE_MARGIN_S)
        if not got:
            sidecar = self._sidecar  # a call still holds the session: stop its ranks under it
            if sidecar is not None:
                sidecar.request_abort(reason)
                sidecar.kill()
            got = self._lock.acquire(timeout=_CLOSE_WAIT_S)
        if not got:
            log.warning("DistDiff: a call still holds the session %g s after %s; its ranks were killed",
                        ABORT_GRACE_S + _CLOSE_MARGIN_S + _CLOSE_WAIT_S, reason)
            return
        try:
            if self._sidecar is not None:
                self._sidecar.close()
            self._sidecar = None
            self.status.set_state(SidecarState.NONE, stage=None, step=None, failure=None)
        finally:
            self._abort_reason = None
            self._lock.release()

    def restart(self) -> None:
        """Stop the ranks and start fresh ones with the same config and model (a call in progress stops first,
        as for close; a status panel's Restart). Blocks until the new ranks are ready; run it off the event loop."""
        self.close(reason="the sidecar was restarted")
        with self._lock:
            self.sidecar  # noqa: B018 - starts the ranks and reloads the model this session had

    @contextlib.contextmanager
    def _stage(self, stage: str, *, state: SidecarState = SidecarState.RUNNING, **on_success):
        """Tell the status board that `stage` runs; on a sidecar failure the board shows the failed rank, on any
        other exception (cancel, bad input, the caller's own interrupt) the sidecar is as before the stage."""
        started = self.status.begin(stage, state=state)
        try:
            yield
        except SidecarError as e:
            failure = failure_from(e, phase=stage)
            sidecar = self._sidecar
            # The failed sidecar's last rows stay on the panel while it shows the failure: the ranks the error
            # names (every rank of a lost node) carry it, the others were stopped because of them.
            self._failed_rows = [] if sidecar is None else rank_statuses(
                StatusSnapshot(), places=sidecar.rank_places, steps={}, gpu_memory=dict(sidecar.rank_gpu_memory),
                rss=dict(sidecar.rank_rss), errors={r: failure.error for r in failure.ranks})
            self.status.fail(failure)
            raise
        except BaseException:
            alive = self._sidecar is not None and self._sidecar.alive()
            self.status.set_state(SidecarState.READY if alive else SidecarState.NONE, stage=None)
            raise
        self.status.end(stage, started, **on_success)

    def _progress(self, on_progress: ProgressFn | None) -> ProgressFn:
        def update(done: int, total: int) -> None:
            self.status.step(done, total)
            if on_progress is not None:
                on_progress(done, total)

        return update

    def _same(self, payload: dict) -> list[dict]:
        return [payload] * self.config.world_size

    # -- stages ------------------------------------------------------------------------------------------------
    def load(self, model: str | Path | ModelFiles, *, should_cancel: CancelFn | None = None) -> dict[str, Any]:
        """Check the model on the host (a diffusers folder path, or single files as `ModelFiles`), then load it on
        every rank (components per the offload policy). A load cannot stop midway: cancelling it stops the ranks
        (see driver.CANCEL_GRACE_S)."""
        from .files import read_source
        from .strategies.cp_checks import check_cp_supported

        info, message = read_source(model)
        model_dir = info["model_dir"]
        if self.config.cp_degree > 1:
            check_cp_supported(info, ring=self.config.ring, ulysses=self.config.ulysses)
        if self.config.cache.value != "none":
            from .strategies.step_cache import check_cache_family

            check_cache_family(self.config.cache, info["family"])
        if "files" in message and self.config.gpus_per_rank > 1:
            raise UnsupportedError(f"gpus_per_rank {self.config.gpus_per_rank} (device_map sharding) is not supported "
                                   "for models loaded from single files yet; use gpus_per_rank 1 (dp / ring / "
                                   "ulysses) or a diffusers folder")
        if self.config.gpus_per_rank > 1 and self.config.max_memory:
            # The placement is a pure function of the folder's configs and the budgets: refuse a plan that does
            # not fit before any rank starts (ranks without max_memory plan on their GPUs' free memory).
            from .pipelines import adapter_for
            from .planning.placement import parse_max_memory
            from .planning.sharding import plan_for_model

            plan_for_model(model_dir, config=self.config, adapter=adapter_for(info["family"]),
                           budgets=parse_max_memory(self.config.max_memory), models=set(info["models"]))
        with self._lock:
            sidecar = self.sidecar
            t0 = time.monotonic()
            if self._model_dir != model_dir:
                # The ranks drop the old model before loading the new one, so after any failure (or cancel) the
                # session holds no model: nothing half-loaded is ever used, and a restart does not reload it.
                self._model_dir = self._model_info = self._load_message = None
                self._loras = ()  # the ranks drop LoRAs with the model they belong to
                with self._stage("load", state=SidecarState.LOADING, model=Path(info["model_dir"]).name,
                                 family=info["family"]):
                    sidecar.call(Op.LOAD, self._same(message), should_cancel=should_cancel)
                self._model_dir, self._model_info, self._load_message = model_dir, info, message
            self.timings.add("load", time.monotonic() - t0)
        return info

    def set_loras(self, loras: Sequence[tuple[str | Path, float]], *,
                  should_cancel: CancelFn | None = None) -> tuple[LoraSpec, ...]:
        """Make every rank hold exactly these LoRAs ((file, strength) pairs, applied in order) for the next stages;
        `[]` removes them all (the base model's exact output again). The files are checked here first (ConfigError
        naming the file); a file diffusers cannot fit to the model raises ModelError naming it, and the ranks are
        left with no LoRA. A strength change or a smaller set only swaps adapters; the base model is not reloaded.
        Loading another model drops the set."""
        from .lora import lora_specs

        specs = lora_specs(loras)
        self._require_model()
        with self._lock:
            if specs == self._loras:
                return specs
            self._loras = None  # unknown until every rank confirms (a failure leaves ranks without LoRAs)
            t0 = time.monotonic()
            self.sidecar.call(Op.SET_LORAS, self._same({"loras": [s.to_message() for s in specs]}),
                              should_cancel=should_cancel)
            self._loras = specs
            self.timings.add("lora", time.monotonic() - t0)
        return specs

    @property
    def loras(self) -> tuple[LoraSpec, ...]:
        """The LoRA set the ranks hold (empty after a failure)."""
        return self._loras or ()

    def encode(self, prompts: list[str] | tuple[str, ...] | str, negative_prompt: str | None = None, *,
               should_cancel: CancelFn | None = None) -> Conditioning:
        """Prompts -> embeddings on the host. Prompts are split over all ranks in contiguous blocks.

        `negative_prompt`: None or "" means none; any other string is used verbatim (Qwen-Image's documented " "
        is a real negative prompt: with it, guidance > 1 runs true CFG)."""
        prompts = _prompt_list(prompts)
        negative_prompt = _negative(negative_prompt)
        self._require_model()
        world = self.config.world_size
        payloads = []
        for rank in range(world):
            start, stop = block_bounds(len(prompts), world, rank)
            payloads.append({"prompts": prompts[start:stop], "negative_prompt": negative_prompt})
        with self._lock:
            sidecar = self.sidecar
            t0 = time.monotonic()
            with self._stage("encode"):
                results = sidecar.call(Op.ENCODE, payloads, should_cancel=should_cancel,
                                       result_bytes=len(prompts) * EMBED_BYTES_PER_PROMPT)
            self.timings.add("encode", time.monotonic() - t0)
        # Copies: large embeddings view the ranks' shared arenas, which the next call may overwrite.
        embeds = tuple({k: v.clone() for k, v in e.items()} for r in results for e in r["embeds"])
        return Conditioning(model_dir=self._model_dir, family=self._model_info["family"], prompts=tuple(prompts),
                            negative_prompt=negative_prompt, embeds=embeds)

    def denoise(self, cond: Conditioning, *, seed: int, steps: int, guidance: float, height: int | None = None,
                width: int | None = None, images_per_prompt: int = 1, num_frames: int = 1,
                latent: torch.Tensor | None = None, denoise: float = 1.0, true_cfg_scale: float = 1.0,
                guidance_2: float | None = None, on_progress: ProgressFn | None = None,
                on_preview: PreviewFn | None = None, preview_every: int = 1,
                should_cancel: CancelFn | None = None) -> torch.Tensor:
        """Embeddings -> ComfyUI LATENT samples (raw VAE space, the family's ComfyUI layout: Flux [B, C, h, w],
        Qwen-Image [B, C, 1, h, w], Wan [B, C, F', h, w]), B = prompts × images_per_prompt, prompt-major; image j
        is made with seed + j.

        `latent` (ComfyUI convention, e.g. an empty latent or a VAE Encode result) sets height, width and frames
        (it wins over the arguments). With `denoise` < 1 it is image-to-image from those latents, equal to the
        family's diffusers img2img pipeline with strength=denoise; a 1-image latent is used for every image, or
        give one per image (see `latent_format.pair_with_images`). At denoise 1.0 its content is not used.

        Guidance: `guidance` is the family's knob (Flux: embedded guidance; Qwen-Image: true CFG scale; Wan: CFG
        scale); `true_cfg_scale` is Flux's true CFG scale (> 1 needs a negative prompt; other families refuse a
        value other than 1); `guidance_2` is Wan 2.2 A14B's low-noise expert CFG scale (None = `guidance`).

        Previews: with `on_preview`, the leader of the first data-parallel group (rank 0, which has the most
        images) sends the x0 estimate of its current image every `preview_every` steps and at the last step of each
        image, as a CPU float16 tensor in the family's preview layout (FamilyAdapter.denoise); `on_preview` gets it
        just before the `on_progress` call of that step. Without `on_preview` no rank computes or sends one."""
        from .latent_format import latent_format, pair_with_images

        self._require_model()
        fmt = latent_format(self._model_info)
        if latent is not None:
            latent = fmt.to_layout(latent, what="latent", sampling=True)
            size = fmt.pixel_size(latent)
            height, width, num_frames = size["height"], size["width"], size["num_frames"]
        elif height is None or width is None:
            raise ConfigError("give height and width, or a latent whose size sets them")
        cp_lengths = self._check_denoise(cond, steps=steps, height=height, width=width,
                                         images_per_prompt=images_per_prompt, num_frames=num_frames, seed=seed,
                                         denoise=denoise)
        check_guidance(self._model_info, negative_prompt=cond.negative_prompt, true_cfg_scale=true_cfg_scale,
                       guidance_2=guidance_2)
        self._check_cfg(cond, seed=seed, steps=steps, guidance=guidance, height=height, width=width,
                        num_frames=num_frames, true_cfg_scale=true_cfg_scale, denoise=denoise)
        if on_preview is not None and (type(preview_every) is not int or preview_every < 1):
            raise ConfigError(f"preview_every must be an integer ≥ 1 (a preview every k steps), "
                              f"got {preview_every!r}")
        inits = None
        if latent is not None:
            paired = pair_with_images(latent, prompts=len(cond.prompts), images_per_prompt=images_per_prompt)
            if denoise < 1.0:
                inits = [fmt.process_in(x) for x in paired]
        elif denoise < 1.0:
            raise ConfigError(f"denoise {denoise} < 1 starts from an image: connect a latent (e.g. VAE Encode), "
                              "or use denoise 1.0")
        items = image_items(len(cond.prompts), images_per_prompt, seed)
        cfg = self.config
        payloads = []
        for rank in range(cfg.world_size):
            dp_index = rank // cfg.group_size  # both CFG halves and every CP rank of a group get the same items
            start, stop = block_bounds(len(items), cfg.dp, dp_index)
            mine = items[start:stop]
            keys = sorted({p for p, _ in mine})
            payloads.append({
                "items": [[str(p), s] for p, s in mine],
                "cond": {str(p): cond.embeds[p] for p in keys},
                "steps": steps, "guidance": float(guidance), "true_cfg_scale": float(true_cfg_scale),
                "guidance_2": None if guidance_2 is None else float(guidance_2), "height": height, "width": width,
                "num_frames": num_frames, "cp_lengths": cp_lengths, "denoise": float(denoise),
                # Every rank of a CP group gets the same init latents, as it gets the same seeds.
                "init_latents": inits[start:stop] if inits is not None else None,
                "preview_every": preview_every if on_preview is not None and rank == 0 else 0,
            })
        with self._lock:
            sidecar = self.sidecar
            t0 = time.monotonic()
            try:
                with self._stage("denoise"):
                    results = sidecar.call(Op.DENOISE, payloads, on_progress=self._progress(on_progress),
                                           on_preview=on_preview, should_cancel=should_cancel, stepped=True,
                                           result_bytes=len(items) * num_frames * height * width
                                           * LATENT_BYTES_PER_PIXEL)
            except BaseException:
                if self._loras:
                    self._loras = None  # a rank that failed applying a LoRA dropped its set (RankEngine._sync_loras)
                raise
            self.timings.add("denoise", time.monotonic() - t0)
        self.last_cp_modes = [r["cp_mode"] for r in results]  # what each rank really ran (tests check it)
        self.last_cfg_stats = [r.get("cfg") for r in results]
        self.last_graphs_compiled = [int(r.get("graphs_compiled", 0)) for r in results]
        self.last_cache_stats = [r.get("cache") for r in results]
        # Each forward is counted once: by the first rank of the CP group that computed it (with cfg = 2 each half
        # computes one branch, so both halves count).
        counted = [r["cache"] for rank, r in enumerate(results) if rank % cfg.cp_degree == 0 and r.get("cache")]
        self.last_run = {
            "cfg": cfg.cfg, "compile": cfg.compile.value, "graphs_compiled": max(self.last_graphs_compiled, default=0),
            "cache": cfg.cache.value, "forwards_skipped": sum(c["skipped"] for c in counted),
            "forwards_cached": sum(c["forwards"] for c in counted),
        }
        self.last_cp_models = [r["cp_models"] for r in results]  # which components ran under CP, per rank
        latents = [lat for r in results if r["latents"] is not None for lat in r["latents"]]
        return fmt.process_out(torch.cat(latents, dim=0))  # the one crossing to ComfyUI's raw space

    def decode(self, latents: torch.Tensor, *, tiling: DecodeTiling | None = None,
               should_cancel: CancelFn | None = None) -> torch.Tensor:
        """A ComfyUI LATENT's samples (raw VAE space, any layout ComfyUI accepts for the family: ours, VAE
        Encode's, an empty latent's) -> float32 images [B, H, W, 3] in 0..1 (video: B × F frames).

        Whole images are split over all ranks. With tiling on and fewer images than ranks, the images are split
        over the data-parallel groups instead and each image's tiles over its group's ranks (tiled_decode); the
        result is the same tiled decode either way. `tiling` AUTO tiles when the planner's estimate of a whole
        decode does not fit the device (decode_fits)."""
        from .latent_format import latent_format
        from .planning import costs
        from .tiled_decode import VaeTiling

        self._require_model()
        fmt = latent_format(self._model_info)
        latents = fmt.to_layout(latents, what="latents")
        tiling = tiling or DecodeTiling()
        if tiling.mode is VaeTiling.AUTO:
            size = fmt.pixel_size(latents)
            whole = decode_fits(self._model_info, config=self.config, height=size["height"], width=size["width"],
                                frames=size["num_frames"])
            if whole:
                tiling = DecodeTiling(mode=VaeTiling.OFF)
            elif tiling.tile_size:
                tiling = DecodeTiling(mode=VaeTiling.ON, tile_size=tiling.tile_size, overlap=tiling.overlap)
            else:  # the tile the estimate assumed
                tiling = DecodeTiling(mode=VaeTiling.ON, tile_size=costs.VAE_TILE, overlap=costs.VAE_TILE // 4)
        world, group = self.config.world_size, self.config.group_size
        split = tiling.mode is VaeTiling.ON and group > 1 and latents.shape[0] < world
        payloads = []
        for rank in range(world):
            if split:  # every rank of a group gets the group's images
                start, stop = block_bounds(latents.shape[0], self.config.dp, rank // group)
            else:
                start, stop = block_bounds(latents.shape[0], world, rank)
            payloads.append({"latents": latents[start:stop] if stop > start else None,  # encode copies it
                             "tiling": tiling.to_message(), "split": split})
        self.last_decode = {"tiling": tiling.mode.value, "split": split}
        with self._lock:
            sidecar = self.sidecar
            t0 = time.monotonic()
            with self._stage("decode"):
                results = sidecar.call(Op.DECODE, payloads, should_cancel=should_cancel,
                                       result_bytes=latents[:, 0].numel() * IMAGE_BYTES_PER_LATENT_PIXEL)
            self.timings.add("decode", time.monotonic() - t0)
        return torch.cat([r["images"] for r in results if r["images"] is not None], dim=0)

    def generate(self, *, model_dir: str | Path | ModelFiles, prompts: list[str], negative_prompt: str | None = None,
                 seed: int, steps: int, guidance: float, height: int | None = None, width: int | None = None,
                 images_per_prompt: int = 1, num_frames: int = 1, latent: torch.Tensor | None = None,
                 denoise: float = 1.0, loras: Sequence[tuple[str | Path, float]] = (),
                 true_cfg_scale: float = 1.0, guidance_2: float | None = None, tiling: DecodeTiling | None = None,
                 on_progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All four stages, with `loras` ((file, strength) pairs) applied. Returns (latents, images); `latent` and
        `denoise` as for `denoise`. `model_dir`: a diffusers folder or single files (ModelFiles)."""
        from .files import read_source
        from .latent_format import latent_format, pair_with_images
        from .lora import lora_specs

        # Everything knowable from the arguments and the model's configs is refused before any rank starts.
        prompts = _prompt_list(prompts)
        info = read_source(model_dir)[0]
        if latent is not None:
            fmt = latent_format(info)
            latent = fmt.to_layout(latent, what="latent", sampling=True)
            size = fmt.pixel_size(latent)
            height, width, num_frames = size["height"], size["width"], size["num_frames"]
            pair_with_images(latent, prompts=len(prompts), images_per_prompt=images_per_prompt)
        check_request(info, steps=steps, height=height, width=width, images_per_prompt=images_per_prompt,
                      num_frames=num_frames, seed=seed, denoise=denoise, prompts=len(prompts))
        check_guidance(info, negative_prompt=_negative(negative_prompt), true_cfg_scale=true_cfg_scale,
                       guidance_2=guidance_2)
        if self.config.cfg > 1:
            # Whether CFG will run is known from the arguments (only the presence of a negative matters here).
            probe = {"negative_prompt_embeds": None} if _negative(negative_prompt) is not None else {}
            _refuse_without_cfg(info, probe, seed=seed, steps=steps, guidance=guidance, height=height, width=width,
                                num_frames=num_frames, true_cfg_scale=true_cfg_scale, denoise=denoise)
        lora_specs(loras)
        self.load(model_dir, should_cancel=should_cancel)
        self.set_loras(loras, should_cancel=should_cancel)
        cond = self.encode(prompts, negative_prompt, should_cancel=should_cancel)
        latents = self.denoise(cond, seed=seed, steps=steps, guidance=guidance, height=height, width=width,
                               images_per_prompt=images_per_prompt, num_frames=num_frames, latent=latent,
                               denoise=denoise, true_cfg_scale=true_cfg_scale, guidance_2=guidance_2,
                               on_progress=on_progress, should_cancel=should_cancel)
        images = self.decode(latents, tiling=tiling, should_cancel=should_cancel)
        return latents, images

    # -- checks --------------------------------------------------------------------------------------------------
    def _require_model(self) -> None:
        if self._model_dir is None:
            raise ConfigError("no model is loaded in this session; call load(model_dir) first")

    def _check_cfg(self, cond: Conditioning, *, true_cfg_scale, **request) -> None:
        if self.config.cfg == 1:
            return
        for embeds in cond.embeds:
            _refuse_without_cfg(self._model_info, embeds, true_cfg_scale=true_cfg_scale, **request)

    def _check_denoise(self, cond: Conditioning, *, steps, height, width, images_per_prompt, num_frames,
                       seed, denoise) -> dict[str, int]:
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
                      num_frames=num_frames, seed=seed, denoise=denoise, prompts=len(cond.prompts))
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


def _negative(negative_prompt: str | None) -> str | None:
    """"" means no negative prompt; any other string (whitespace included) is one, kept verbatim."""
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ConfigError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
    return negative_prompt or None


def check_guidance(info: dict[str, Any], *, negative_prompt: str | None, true_cfg_scale, guidance_2) -> None:
    """The guidance options against the model (`pipelines.read_model_config`) and the negative prompt; needs no rank.
    Options a family would silently ignore are refused, so a setting never looks applied when it is not."""
    family = str(info["family"])
    for name, value in (("true_cfg_scale", true_cfg_scale), ("guidance_2", guidance_2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"{name} must be a number ≥ 0, got {value!r}")
    if true_cfg_scale != 1.0:
        if family != "flux":
            raise ConfigError(f"true_cfg_scale {true_cfg_scale} is Flux's true CFG scale; {family} takes its CFG "
                              "scale from guidance: set guidance instead and leave true_cfg_scale at 1")
        if true_cfg_scale > 1.0 and negative_prompt is None:
            raise ConfigError(f"true_cfg_scale {true_cfg_scale} needs a negative prompt (Flux's true CFG steers away "
                              "from it): give one when encoding, or set true_cfg_scale to 1 (off)")
    if guidance_2 is not None and info["model_index"].get("boundary_ratio") is None:
        raise ConfigError(f"guidance_2 {guidance_2} is the low-noise expert's CFG scale of a two-expert model (Wan 2.2 "
                          f"A14B, boundary_ratio in model_index.json); {info['model_dir']} has no second expert: "
                          "leave guidance_2 unset")


def _refuse_without_cfg(info: dict[str, Any], cond: dict, *, seed, steps, guidance, height, width, num_frames,
                        true_cfg_scale, denoise=1.0) -> None:
    """ConfigError when a cfg = 2 session gets a call in which the pipeline would not run classifier-free guidance
    (there would be no second branch for the other half to compute)."""
    from .pipelines import adapter_for
    from .pipelines.base import ImageRequest

    request = ImageRequest(seed=seed, steps=steps, guidance=float(guidance), height=height, width=width,
                           num_frames=num_frames, true_cfg_scale=float(true_cfg_scale),
                           denoise=float(denoise))
    reason = adapter_for(info["family"]).cfg_off_reason(cond, request)
    if reason is not None:
        raise ConfigError(f"cfg=2 (CFG parallel) needs classifier-free guidance in every call, but {reason}; "
                          "or use a session with cfg=1 for this call")


def check_request(info: dict[str, Any], *, steps, height, width, images_per_prompt, num_frames, seed,
                  denoise: float = 1.0, prompts: int = 1) -> None:
    """The denoise arguments against the model's configs (`pipelines.read_model_config`); needs no rank."""
    from .pipelines import adapter_for

    for name, value, low in (("steps", steps, 1), ("images_per_prompt", images_per_prompt, 1),
                             ("num_frames", num_frames, 1), ("height", height, 1), ("width", width, 1)):
        if type(value) is not int or value < low:
            raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if type(seed) is not int or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) or not 0.0 < denoise <= 1.0:
        raise ConfigError(f"denoise must be a number in (0, 1], got {denoise!r}")
    last = seed + prompts * images_per_prompt - 1
    if last > SEED_MAX:
        raise ConfigError(f"image j uses seed + j: seed ({seed}) + prompts ({prompts}) × images_per_prompt "
                          f"({images_per_prompt}) − 1 = {last} is over 2^64 − 1 = {SEED_MAX}, the largest seed torch "
                          f"takes; use a seed ≤ {SEED_MAX - prompts * images_per_prompt + 1}")
    adapter = adapter_for(info["family"])
    adapter.check_size(info, height=height, width=width, num_frames=num_frames)
    adapter.check_denoise(float(denoise))


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


def shutdown_all(*, reason: str = "the sidecar was released") -> None:
    """Stop the live sidecar (ComfyUI's release node and route, and process exit, call this). A call running on
    another thread stops with Cancelled(reason) (see Session.close); blocks a few seconds at most, so the routes
    run it off ComfyUI's event loop. Holds the registry meanwhile: a new session starts only once the old ranks
    are gone (their GPUs free)."""
    global _current
    with _registry_lock:
        if _current is not None:
            _current.close(reason=reason)
        _current = None


def decode_fits(model_info: dict, *, config: SessionConfig, height: int, width: int, frames: int) -> bool:
    """Whether one whole (untiled) VAE decode of this size fits one rank's device, by the planner's estimate and
    rule (planning.costs.vae_decode_bytes, decode_needs_tiles): CUDA: the device's memory; CPU: this machine's RAM
    shared by the ranks (as `generate --auto` plans CPU ranks)."""
    import os

    from .pipelines import Family
    from .planning import costs
    from .planning.model_facts import vae_geometry

    _, temporal, channels = vae_geometry(Family(model_info["family"]), model_info["components"]["vae"])
    element = 4 if config.dtype.value == "float32" else 2
    need = costs.vae_decode_bytes(channels=channels, height=height, width=width, frames=frames, temporal=temporal,
                                  tile=None, element=element)
    if config.device.value == "cuda":
        from .planning.hardware import detect_gpus

        memory = detect_gpus().memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // config.world_size
    # The VAE's own weights (≤ 0.3 GB for these families) are within the reserve's slack; the host reads no weights.
    return not costs.decode_needs_tiles(whole=need, memory=memory, vae_weights=0)

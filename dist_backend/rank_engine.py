"""What a rank does for each call. One instance per rank process; the host sends every rank the same op
(with its own share of the work) and every rank answers."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import faults, protocol
from .config import CacheMode, Compile, Offload, SessionConfig
from .errors import Cancelled, ConfigError
from .pipelines.base import ImageRequest

if TYPE_CHECKING:
    from .lora import LoraSpec

log = logging.getLogger(__name__)


def cp_mode_of(transformer) -> str | None:
    from .strategies.context_parallel import cp_mode

    return cp_mode(transformer)


class RankEngine:
    def __init__(self, *, config: SessionConfig, rank: int, device: torch.device, channel, beater=None,
                 gpus: tuple[int, ...] | None = None) -> None:
        self.config = config
        # This machine's CUDA indices of the rank (a joined node numbers its own GPUs); None: config.rank_gpus.
        self.gpus = config.rank_gpus(rank) if gpus is None else tuple(gpus)
        self.beater = beater  # beat.Beater: told when weights load (the host then expects no denoise step)
        self.rank = rank
        self.device = device
        self.channel = channel
        cp, size = config.cp_degree, config.group_size
        # rank = dp_index · (cfg · cp) + cfg_rank · cp + cp_rank: each data-parallel group computes its images
        # together; with cfg = 2 its two halves (one CP group each) compute the two guidance branches.
        self.dp_index, within = divmod(rank, size)
        self.cfg_rank, self.cp_rank = divmod(within, cp)
        self.is_leader = within == 0  # the rank of its data-parallel group that answers with results
        self.image_group = None  # all ranks of this data-parallel group: they stop (cancel) at the same step
        self.cfg_group = None
        self.mesh = None
        if size > 1:
            from .strategies.context_parallel import build_mesh

            # NOTE: collectives: every rank builds the same mesh and the same groups, in the same order, at the
            # same point of start-up (new_group must be called by all ranks for every group).
            self.mesh = build_mesh(device_type=device.type, dp=config.dp, cfg=config.cfg, ring=config.ring,
                                   ulysses=config.ulysses)
            if config.cfg > 1:
                self.cfg_group = self.mesh["cfg"].get_group()
            for index in range(config.dp):
                group = dist.new_group(ranks=list(range(index * size, (index + 1) * size)))
                if index == self.dp_index:
                    self.image_group = group
        # The ranks sharing one image's tokens in one branch (a step cache decides over them): the image group when
        # cfg = 1, else each half of it.
        self.cp_group = None
        if cp > 1:
            if config.cfg == 1:
                self.cp_group = self.image_group
            else:
                for start in range(0, config.world_size, cp):  # NOTE: every rank creates every group, in order
                    group = dist.new_group(ranks=list(range(start, start + cp)))
                    if start == rank - self.cp_rank:
                        self.cp_group = group
        self.residency = None
        self.adapter = None
        self.model_info: dict[str, Any] | None = None
        self.loras: tuple[LoraSpec, ...] = ()  # the wanted set, applied whenever the transformer is loaded
        self._call_id = None
        self._cancel_seen = False
        self.fault = faults.from_env(rank)  # test-only fault injection; None unless DISTDIFF_FAULT names this rank

    # -- dispatch ----------------------------------------------------------------------------------------------
    def handle(self, op: str | None, message: dict) -> Any:
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise ConfigError(f"unknown op {op!r}")
        self._call_id = message.get("id")
        self._op = op
        self._cancel_seen = False
        if self.fault is not None:
            self.fault.at(op, channel=self.channel)
        return handler(message)

    def op_ping(self, message: dict) -> dict:
        from .lora import loaded_adapters

        pipe = self.residency.pipe if self.residency is not None else None
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device),
                "model": self.model_info["model_dir"] if self.model_info else None,
                "loads": dict(self.residency.load_counts) if self.residency is not None else {},
                # (component, device) in the order they were read: each was placed before the next was read.
                "load_log": [list(e) for e in self.residency.load_log] if self.residency is not None else [],
                "adapters": sorted(loaded_adapters(pipe)) if pipe is not None else []}

    def op_set_loras(self, message: dict) -> dict:
        """Record the wanted LoRA set and apply it now if the transformer is loaded (else at the next denoise).
        NOTE: symmetric: every rank gets the same set, so every rank disables CP (a collective-free change) and
        loads the same adapters; the next denoise enables CP again on all of them."""
        from .lora import LoraSpec

        self._require_model()
        self.loras = tuple(LoraSpec.from_message(m) for m in message["loras"])
        if self.residency.pipe is not None:
            self._sync_loras(self.residency.pipe)
        return {"adapters": [s.name for s in self.loras]}

    def op_load(self, message: dict) -> dict:
        """Load a diffusers folder ({"model_dir": path}) or single files ({"files": ModelFiles message})."""
        from .files import ModelFiles, read_files_config
        from .pipelines import adapter_for, read_model_config
        from .residency import Residency

        files_info = None
        if message.get("files") is not None:
            info = files_info = read_files_config(ModelFiles.from_message(message["files"]))
            model_dir = info["model_dir"]  # the files' key
        else:
            model_dir = message["model_dir"]
            info = read_model_config(model_dir)
        if self.model_info is not None and self.model_info["model_dir"] == model_dir:
            return {"family": info["family"], "loaded": sorted(self.residency.loaded)}
        self.close()
        self.adapter = adapter_for(info["family"])
        self.model_info = {**info, "model_dir": model_dir}
        # Only components with weights in this folder (Wan 2.1 lists transformer_2 as null, for example).
        heavy = tuple(c for c in (*self.adapter.text_components, *self.adapter.denoise_components,
                                  *self.adapter.decode_components) if c in info["models"])
        load_kwargs = None
        if self.config.gpus_per_rank > 1:
            from .planning.sharding import load_kwargs_for, plan_for_model, rank_budgets

            if files_info is not None:  # the host refuses this before start (Session.load)
                raise ConfigError("gpus_per_rank > 1 is not supported for models loaded from single files")
            gpus = self.gpus
            plan = plan_for_model(model_dir, config=self.config, adapter=self.adapter,
                                  budgets=rank_budgets(self.config, gpus), models=set(heavy))
            log.info("device_map plan:\n%s", plan.describe())
            load_kwargs = load_kwargs_for(plan, self.adapter, gpus)
        self.residency = Residency(
            model_dir, heavy=heavy, dtype=getattr(torch, self.config.dtype.value), device=self.device,
            load_kwargs=load_kwargs, files_info=files_info, loading=self._loading,
        )
        try:
            if self.config.offload is Offload.RESIDENT:
                self.residency.ensure(heavy)
            else:
                self.residency.ensure(self.adapter.text_components)  # first stage only; the rest loads when needed
        except BaseException:
            # Nothing half-loaded: without this, model_info already names the folder and the next load of the same
            # folder would return early with an empty pipeline.
            self.close()
            raise
        return {"family": info["family"], "loaded": sorted(self.residency.loaded)}

    def op_encode(self, message: dict) -> dict:
        self._require_model()
        prompts = message["prompts"]
        out = []
        if prompts:
            pipe = self.residency.ensure(self.adapter.text_components)
            with torch.inference_mode():
                for prompt in prompts:
                    out.append(self.adapter.encode(pipe, prompt=prompt, negative_prompt=message.get("negative_prompt"),
                                                   device=self.device))
        if self.config.offload is Offload.STAGED:
            self.residency.release(self.adapter.text_components)
        return {"embeds": out}

    def op_denoise(self, message: dict) -> dict:
        from .pipelines._common import steps_run

        self._require_model()
        items = message["items"]
        cond = message["cond"]
        inits = message.get("init_latents") or [None] * len(items)  # one per item, or none (text-to-image)
        denoise = float(message.get("denoise", 1.0))
        steps = steps_run(message["steps"], denoise)  # the steps each item really runs (img2img skips some)
        total = len(items) * steps
        # Previews every k-th step, from the one rank the host asked (0 = none): see Session.denoise.
        preview_every = int(message.get("preview_every", 0))
        latents = []
        # Under CFG parallel: forwards this rank computed (one per step, not two), exchanges and bytes it sent.
        cfg_stats = {"forwards": 0, "exchanges": 0, "bytes_sent": 0}
        cache_stats = {"forwards": 0, "skipped": 0}  # step cache decisions over this call's images
        pipe = self.residency.ensure(self.adapter.denoise_components)
        graphs_before = self._graphs_compiled()
        try:
            self._sync_loras(pipe)  # a transformer reloaded by staged offload gets its adapters again here
            cp_models = self.adapter.cp_models(pipe) if self.config.cp_degree > 1 else {}
            for model in cp_models.values():
                self._set_cp_mode(model, message["cp_lengths"])
            if self.config.compile is Compile.REGIONAL:
                self._compile(pipe)  # after CP: the compiled blocks contain the CP attention
            for index, ((key, seed), init) in enumerate(zip(items, inits)):
                request = ImageRequest(seed=seed, steps=message["steps"], guidance=message["guidance"],
                                       true_cfg_scale=message.get("true_cfg_scale", 1.0),
                                       guidance_2=message.get("guidance_2"),
                                       height=message["height"], width=message["width"],
                                       num_frames=message.get("num_frames", 1), denoise=denoise)
                done_before = index * steps

                def on_step(done: int, steps: int, *, preview=None, _before: int = done_before) -> None:
                    wanted = preview is not None and preview_every > 0 and (done % preview_every == 0 or done == steps)
                    # float16: the preview is for the eye; half the bytes of the progress message.
                    self._step_boundary(_before + done, total,
                                        preview=preview().to("cpu", torch.float16) if wanted else None)

                with torch.inference_mode(), self._cfg_split(pipe, cond[key], request) as split, \
                        self._step_cache(pipe, request) as cached:
                    latent = self.adapter.denoise(pipe, cond=cond[key], request=request, device=self.device,
                                                  on_step=on_step, init_latents=init)
                if cached is not None:
                    cache_stats["forwards"] += cached.forwards
                    cache_stats["skipped"] += cached.skipped
                latents.append(latent)
                if split is not None:
                    cfg_stats["forwards"] += split.forwards
                    cfg_stats["exchanges"] += split.exchanges
                    cfg_stats["bytes_sent"] += split.bytes_sent
            # What really ran, read before a staged release: every CP model must be in the same mode.
            modes = {cp_mode_of(model) for model in cp_models.values()}
            assert len(modes) <= 1, f"CP models in different modes: {modes}"
            mode = modes.pop() if modes else None
        finally:
            if self.config.offload is Offload.STAGED:
                self.residency.release(self.adapter.denoise_components)
        return {"latents": latents if self.is_leader else None, "cp_mode": mode, "cp_models": sorted(cp_models),
                "cfg": cfg_stats if self.config.cfg > 1 else None,
                "graphs_compiled": self._graphs_compiled() - graphs_before,
                "cache": cache_stats if self.config.cache is not CacheMode.NONE else None}

    def op_decode(self, message: dict) -> dict:
        """{"latents", "tiling": DecodeTiling message, "split": bool}. Without split, this rank decodes the images it
        was sent. With split, every rank of a data-parallel group gets the group's images, and each image's tiles
        are decoded by all of them (tiled_decode.split_decode); the group's leader answers with the images."""
        from .tiled_decode import DecodeTiling, apply, split_decode, splittable, uses_tiles

        self._require_model()
        latents = message["latents"]
        if latents is None or latents.shape[0] == 0:
            return {"images": None}
        pipe = self.residency.ensure(self.adapter.decode_components)
        apply(pipe.vae, DecodeTiling.from_message(message.get("tiling")))
        split = bool(message.get("split")) and self.image_group is not None and splittable(pipe.vae)
        images = []
        with torch.inference_mode():
            # One image at a time: a batched VAE decode is not bit-identical to the per-image decode of the plain
            # pipeline (convolution blocking depends on the batch), and the seed contract is per image.
            for i in range(latents.shape[0]):
                z = latents[i:i + 1].to(device=self.device, dtype=pipe.vae.dtype)
                # NOTE: the same decision on every rank of the group: same latents, same tiling, same VAE class.
                if split and uses_tiles(pipe.vae, z):
                    size = self.config.group_size
                    decoded = split_decode(pipe.vae, z, group=self.image_group, index=self.rank % size, size=size,
                                           leader=self.rank - self.rank % size)
                    if decoded is not None:
                        images.append(self.adapter.to_images(pipe, decoded))
                elif self.is_leader or not split:
                    images.append(self.adapter.decode(pipe, latents=z, device=self.device))
        return {"images": torch.cat(images) if images else None}

    def op_unload(self, message: dict) -> dict:
        self.close()
        return {"unloaded": True}

    # -- helpers -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _loading(self):
        """Around every weights load (any stage): the beats say so, so a long staged reload is not a hung step."""
        with self.beater.loading() if self.beater is not None else contextlib.nullcontext():
            if self.fault is not None:
                self.fault.at(self._op, load=True)
            yield

    def _require_model(self) -> None:
        if self.residency is None:
            raise ConfigError("no model loaded on this sidecar; call load(model_dir) first")

    def _sync_loras(self, pipe) -> None:
        """Make the pipeline hold exactly self.loras. LoRAs must wrap the layers before CP places its hooks, so CP
        is disabled first when anything changes (_set_cp_mode enables it again). A file that fails to load leaves
        the wanted set empty and drops the LoRA-loadable components, which the next stage reloads from disk: after
        a failed diffusers load nothing half-changed is ever used, and the next run gives the base model's image."""
        from .lora import sync_loras
        from .strategies.context_parallel import disable_context_parallel

        def before_change() -> None:
            for model in self.adapter.cp_models(pipe).values():  # every denoise model (Wan 2.2: both experts)
                disable_context_parallel(model)  # no-op when CP is not enabled
            if self.config.compile is Compile.REGIONAL:
                from .strategies.regional_compile import reset_compiled

                reset_compiled()  # no graph traced without the LoRA layers (or with the old CP hooks) is reused

        try:
            sync_loras(pipe, specs=self.loras, before_change=before_change)
        except BaseException:
            self.loras = ()
            self.residency.release(getattr(pipe, "_lora_loadable_modules", ("transformer",)))
            raise

    def _set_cp_mode(self, transformer: torch.nn.Module, lengths: dict[str, int]) -> None:
        """Enable CP in the mode this request needs (plain, or diffusers' uneven "anything" mode).
        NOTE: symmetric: the host sends every rank the same `cp_lengths` for the whole call, so every rank of every
        CP group takes the same branch here, at the same point, before its first item."""
        from .strategies.context_parallel import (CPMode, cp_config_for, cp_mode, disable_context_parallel,
                                                  enable_context_parallel)

        ring, ulysses = self.config.ring, self.config.ulysses
        wanted = cp_config_for(ring=ring, ulysses=ulysses, mesh=None, seq_lengths=lengths)
        wanted_mode = CPMode.of(wanted)
        current = cp_mode(transformer)
        if current == wanted_mode:
            return
        if current is not None:
            disable_context_parallel(transformer)
            if self.config.compile is Compile.REGIONAL:
                from .strategies.regional_compile import reset_compiled

                reset_compiled()  # graphs traced with the old CP hooks must not be reused
        enable_context_parallel(transformer, ring=ring, ulysses=ulysses, mesh=self.mesh, seq_lengths=lengths,
                                attention_backend=self.config.attention_backend or None)

    def _step_cache(self, pipe, request: ImageRequest):
        """diffusers' step cache on the transformer for one image (fresh state), deciding over the CP group."""
        from .pipelines._common import steps_run
        from .strategies.step_cache import step_cache

        if self.config.cache is not CacheMode.NONE and getattr(pipe, "transformer_2", None) is not None:
            # Wan 2.2's two experts would each need their own cache; not wired yet. Same on every rank.
            raise ConfigError("step caching supports pipelines with one transformer; use cache='none' here")
        return step_cache(pipe.transformer, mode=self.config.cache, threshold=self.config.cache_threshold,
                          steps=steps_run(request.steps, request.denoise), group=self.cp_group)

    def _compile(self, pipe) -> None:
        from .strategies.regional_compile import compile_regions

        for model in self.adapter.cp_models(pipe).values():  # every denoise model (Wan 2.2: both experts)
            compile_regions(model)

    def _graphs_compiled(self) -> int:
        if self.config.compile is Compile.NONE:
            return 0
        from .strategies.regional_compile import graphs_compiled

        return graphs_compiled()

    def _cfg_split(self, pipe, cond: dict, request: ImageRequest):
        """With cfg = 2: this half computes only its guidance branch during the call (strategies/cfg_parallel.py)."""
        import contextlib

        if self.config.cfg == 1:
            return contextlib.nullcontext()
        from .strategies.cfg_parallel import split_cfg

        reason = self.adapter.cfg_off_reason(cond, request)
        if reason is not None:
            # The host refuses this before the call (Session._check_cfg); every rank gets the same request, so
            # every rank raises here alike and none is left waiting in the exchange.
            raise ConfigError(f"cfg=2 needs classifier-free guidance, but {reason}")
        # Every denoise model (Wan 2.2: both experts; each step calls one of them for both branches).
        return split_cfg(tuple(self.adapter.cp_models(pipe).values()), group=self.cfg_group, cfg_rank=self.cfg_rank)

    def _step_boundary(self, done: int, total: int, *, preview: torch.Tensor | None = None) -> None:
        """After every denoise step: report progress (with a preview latent when one is due), and decide together
        whether to stop."""
        if self.fault is not None:
            self.fault.at(protocol.Op.DENOISE, done)
        # Every rank says it is alive each step (the host's heartbeat_timeout_s watches each rank, and a CP
        # non-leader would otherwise be silent for the whole denoise); only leaders' messages count as progress.
        event = protocol.Event.PROGRESS if self.is_leader else protocol.Event.HEARTBEAT
        message = {"id": self._call_id, "event": event, "done": done, "total": total}
        if preview is not None and self.is_leader:
            message["preview"] = preview
        self.channel.send(protocol.encode(message))
        self._drain_cancel()
        stop = self._cancel_seen
        if self.image_group is not None:
            # NOTE: symmetric: every rank of this data-parallel group (both CFG halves, all CP ranks) reaches this
            # all_reduce once per step, so all of them leave at the same step (any_rank(cancel_requested)); a rank
            # that raised instead never gets here and its peers then fail on the process-group timeout, which the
            # host turns into a restart.
            flag = torch.tensor([1 if stop else 0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.image_group)
            stop = bool(flag.item())
        if stop:
            raise Cancelled(f"cancelled after step {done} of {total}")

    def _drain_cancel(self) -> None:
        while self.channel.poll(0):
            message = protocol.decode(self.channel.recv(timeout=self.config.heartbeat_timeout_s))
            if isinstance(message, dict) and message.get("op") == protocol.Op.CANCEL:
                self._cancel_seen = True

    def close(self) -> None:
        if self.residency is not None:
            self.residency.close()
        self.residency = None
        self.loras = ()  # LoRAs belong to a model
        self.adapter = None
        self.model_info = None

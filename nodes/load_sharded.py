"""LoadSharded: pick a diffusers model and how to spread it over GPUs; starts (or reuses) the rank sidecar."""

from __future__ import annotations

from . import cluster_inputs, parallel_inputs
from .common import (CATEGORY, PIPELINE, PLAN_OUTPUT, PipelineHandle, comfy_should_cancel, folder_fingerprint,
                     list_models, resolve_model, run_cancellable)


class LoadSharded:
    DESCRIPTION = ("Loads a diffusers pipeline on a sidecar of rank processes (one per GPU, or CPU ranks) that "
                   "stays up between runs. Choose data parallel (dp), context parallel (ring / ulysses) or "
                   "device_map sharding (gpus_per_rank > 1), and CFG parallel (cfg = 2); the product dp × cfg × ring × "
                   "ulysses × gpus_per_rank is the number of GPUs used. strategy auto lets the planner choose them; the plan "
                   "output says what was chosen (or how the degrees set by hand run) and why. With cluster, ranks on "
                   "other machines (started there by python -m dist_backend join) join the sidecar.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE, PLAN_OUTPUT[0])  # appended, never inserted: API workflows link outputs by index
    RETURN_NAMES = ("pipeline", PLAN_OUTPUT[1])
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        models = list_models() or ["(put diffusers folders in models/diffusers)"]
        return {
            "required": {
                "model": (models, {"tooltip": "A diffusers pipeline folder (with model_index.json) in models/diffusers."}),
                **parallel_inputs.REQUIRED,
            },
            "optional": {
                **parallel_inputs.OPTIONAL,
                "model_path": ("STRING", {"default": "",
                                          "tooltip": "Absolute path of a diffusers folder; overrides model when set."}),
                **parallel_inputs.ADDED,
                **cluster_inputs.OPTIONAL,  # last: saved workflows list widget values by position
            },
        }

    @classmethod
    def IS_CHANGED(cls, model, model_path="", **kwargs):
        # The output (a PipelineHandle: config, folder, family) changes only with the inputs, which ComfyUI compares
        # itself, and with the folder's files. Not with the sidecar: downstream nodes get the live session from the
        # handle (PipelineHandle.session restarts a dead or released sidecar), and the cached embeddings and latents
        # are plain CPU data that stay valid, so a restart must not re-run them.
        try:
            return folder_fingerprint(resolve_model(model, model_path)) + cluster_inputs.file_fingerprint()
        except Exception:  # noqa: BLE001 - a missing folder: load() raises the clear ModelError
            return float("nan")

    def load(self, model, model_path="", **settings):
        from ..dist_backend.planning.model_facts import read_model_facts

        model_dir = resolve_model(model, model_path)
        config, plan, cluster, session = parallel_inputs.loader_session(
            settings, facts=lambda: read_model_facts(model_dir))
        info = run_cancellable(lambda: session.load(model_dir, should_cancel=comfy_should_cancel()))
        return (PipelineHandle(config=config, model_dir=model_dir, family=info["family"], plan=plan,
                               cluster=cluster), plan.text)

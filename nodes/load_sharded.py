"""LoadSharded: pick a diffusers model and how to spread it over GPUs; starts (or reuses) the rank sidecar."""

from __future__ import annotations

from .common import (CATEGORY, PIPELINE, PipelineHandle, comfy_should_cancel, folder_fingerprint, list_models,
                     resolve_model, run_cancellable)


class LoadSharded:
    DESCRIPTION = ("Loads a diffusers pipeline on a sidecar of rank processes (one per GPU, or CPU ranks) that "
                   "stays up between runs. Choose data parallel (dp), context parallel (ring / ulysses) or "
                   "device_map sharding (gpus_per_rank > 1); the product dp × ring × ulysses × gpus_per_rank is "
                   "the number of GPUs used.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        models = list_models() or ["(put diffusers folders in models/diffusers)"]
        return {
            "required": {
                "model": (models, {"tooltip": "A diffusers pipeline folder (with model_index.json) in models/diffusers."}),
                "ranks": ("INT", {"default": 2, "min": 1, "max": 64,
                                  "tooltip": "Number of rank processes (world size). On CUDA, GPUs used = ranks × gpus_per_rank."}),
                "dp": ("INT", {"default": 0, "min": 0, "max": 64,
                               "tooltip": "Data-parallel groups that split the images; 0 = ranks / (ring × ulysses)."}),
                "ring": ("INT", {"default": 1, "min": 1, "max": 64,
                                 "tooltip": "Ring-attention degree per group (context parallel; less memory per GPU)."}),
                "ulysses": ("INT", {"default": 1, "min": 1, "max": 64,
                                    "tooltip": "Ulysses-attention degree per group (context parallel; needs heads divisible by it)."}),
                "device": (["auto", "cuda", "cpu"], {"default": "auto",
                                                     "tooltip": "auto = cuda when available, else cpu (gloo)."}),
                "dtype": (["bfloat16", "float16", "float32"], {"default": "bfloat16",
                                                               "tooltip": "Weights and compute dtype (cpu: bfloat16 or float32)."}),
                "offload": (["resident", "staged"], {"default": "resident",
                                                     "tooltip": "staged frees the text encoders after encoding and the transformer after denoising."}),
            },
            "optional": {
                "gpus_per_rank": ("INT", {"default": 1, "min": 1, "max": 16,
                                          "tooltip": "GPUs owned by each rank; > 1 shards components over them with device_map."}),
                "device_map": (["none", "balanced", "auto"], {"default": "none",
                                                             "tooltip": "Placement over a rank's GPUs when gpus_per_rank > 1."}),
                "max_memory": ("STRING", {"default": "",
                                          "tooltip": "Per-GPU budget within a rank for device_map, e.g. 0=16GB,1=16GB."}),
                "attention_backend": ("STRING", {"default": "",
                                                 "tooltip": "diffusers attention backend, e.g. flash or _native_cudnn (empty = native)."}),
                "model_path": ("STRING", {"default": "",
                                          "tooltip": "Absolute path of a diffusers folder; overrides model when set."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model, model_path="", **kwargs):
        # The output (a PipelineHandle: config, folder, family) changes only with the inputs, which ComfyUI compares
        # itself, and with the folder's files. Not with the sidecar: downstream nodes get the live session from the
        # handle (PipelineHandle.session restarts a dead or released sidecar), and the cached embeddings and latents
        # are plain CPU data that stay valid, so a restart must not re-run them.
        try:
            return folder_fingerprint(resolve_model(model, model_path))
        except Exception:  # noqa: BLE001 - a missing folder: load() raises the clear ModelError
            return float("nan")

    def load(self, model, ranks, dp, ring, ulysses, device, dtype, offload, gpus_per_rank=1, device_map="none",
             max_memory="", attention_backend="", model_path=""):
        from ..dist_backend.config import SessionConfig
        from ..dist_backend.session import get_session

        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and dtype == "float16":
            dtype = "bfloat16"  # the node default is for GPUs; CPU kernels want bf16/fp32
        config = SessionConfig(world_size=ranks, dp=dp, ring=ring, ulysses=ulysses, device=device, dtype=dtype,
                               offload=offload, gpus_per_rank=gpus_per_rank, device_map=device_map,
                               max_memory=max_memory.strip(), attention_backend=attention_backend.strip())
        model_dir = resolve_model(model, model_path)
        session = get_session(config)
        info = run_cancellable(lambda: session.load(model_dir, should_cancel=comfy_should_cancel()))
        return (PipelineHandle(config=config, model_dir=model_dir, family=info["family"]),)

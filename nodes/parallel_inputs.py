"""The parallel settings every loader node shares, declared once (the way ComfyUI core declares its sampler
inputs), and the one function that turns them into a SessionConfig.

To add a setting: add its input to REQUIRED or OPTIONAL (with a tooltip and a default) and map it in
`session_config`; every loader node gets it.
"""

from __future__ import annotations

REQUIRED = {
    "ranks": ("INT", {"default": 2, "min": 1, "max": 64,
                      "tooltip": "Number of rank processes (world size). On CUDA, GPUs used = ranks × gpus_per_rank."}),
    "dp": ("INT", {"default": 0, "min": 0, "max": 64,
                   "tooltip": "Data-parallel groups that split the images; 0 = ranks / (ring × ulysses)."}),
    "ring": ("INT", {"default": 1, "min": 1, "max": 64,
                     "tooltip": "Ring-attention degree per group (context parallel; less memory per GPU)."}),
    "ulysses": ("INT", {"default": 1, "min": 1, "max": 64,
                        "tooltip": "Ulysses-attention degree per group (context parallel; needs heads divisible by it)."}),
    "device": (["auto", "cuda", "cpu"], {"default": "auto", "tooltip": "auto = cuda when available, else cpu (gloo)."}),
    "dtype": (["bfloat16", "float16", "float32"], {"default": "bfloat16",
                                                   "tooltip": "Weights and compute dtype (cpu: bfloat16 or float32)."}),
    "offload": (["resident", "staged"], {"default": "resident",
                                         "tooltip": "staged frees the text encoders after encoding and the transformer after denoising."}),
}

OPTIONAL = {
    "gpus_per_rank": ("INT", {"default": 1, "min": 1, "max": 16,
                              "tooltip": "GPUs owned by each rank; > 1 shards components over them with device_map."}),
    "device_map": (["none", "balanced", "auto"], {"default": "none",
                                                 "tooltip": "Placement over a rank's GPUs when gpus_per_rank > 1."}),
    "max_memory": ("STRING", {"default": "", "tooltip": "Per-GPU budget within a rank for device_map, e.g. 0=16GB,1=16GB."}),
    "attention_backend": ("STRING", {"default": "",
                                     "tooltip": "diffusers attention backend, e.g. flash or _native_cudnn (empty = native)."}),
    "cfg": ("INT", {"default": 1, "min": 1, "max": 2,
                    "tooltip": "CFG parallel: 2 computes the prompt and negative-prompt branches of each "
                               "step on two halves of the ranks at once (needs CFG: guidance > 1, Flux: true_cfg > 1, and a "
                               "negative prompt; ranks = dp × cfg × ring × ulysses)."}),
    "compile": (["none", "regional"], {"default": "none",
                                       "tooltip": "regional: torch.compile the transformer's repeated "
                                                  "block once; the first run of a new size pays the "
                                                  "compile, later runs are faster."}),
    "cache": (["none", "first_block", "taylorseer", "magcache"], {
        "default": "none",
        "tooltip": "Step caching (diffusers' cache hooks): skips transformer work on steps that change "
                   "little. Faster, not exact; magcache is for Flux only. Skipped steps show in the "
                   "DistDiff status panel."}),
    "cache_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                  "tooltip": "first_block / magcache threshold; 0 = diffusers' default "
                                             "(0.05 / 0.06). Higher skips more."}),
    # Last: saved UI workflows list widget values by position, so a new input goes after the old ones.
    "gpus": ("STRING", {"default": "",
                        "tooltip": "Which GPUs the ranks use, e.g. 0,1,2,3 (CUDA indices as this ComfyUI sees them), "
                                   "in rank order; list exactly ranks × gpus_per_rank of them. Empty = GPUs 0 … "
                                   "ranks × gpus_per_rank − 1. Leave ComfyUI's own GPU out of the list to keep it "
                                   "free."}),
}

NAMES = (*REQUIRED, *OPTIONAL)


def split(kwargs: dict) -> tuple[dict, dict]:
    """(the parallel settings, everything else) of a node's keyword arguments."""
    return ({k: v for k, v in kwargs.items() if k in NAMES}, {k: v for k, v in kwargs.items() if k not in NAMES})


def session_config(settings: dict):
    """The SessionConfig of the parallel settings (defaults for optional ones not given); validated there."""
    from ..dist_backend.config import SessionConfig

    s = {**{k: spec[1]["default"] for k, spec in OPTIONAL.items()}, **settings}
    device, dtype = s["device"], s["dtype"]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == "float16":
        dtype = "bfloat16"  # the node default is for GPUs; CPU kernels want bf16/fp32
    return SessionConfig(world_size=s["ranks"], dp=s["dp"], ring=s["ring"], ulysses=s["ulysses"], device=device,
                         dtype=dtype, offload=s["offload"], gpus_per_rank=s["gpus_per_rank"],
                         gpu_ids=s["gpus"], device_map=s["device_map"], max_memory=s["max_memory"].strip(),
                         attention_backend=s["attention_backend"].strip(), cfg=s["cfg"], compile=s["compile"],
                         cache=s["cache"], cache_threshold=s["cache_threshold"])

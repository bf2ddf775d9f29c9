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
}

# Inputs added after the first release, in the order they came, last among a loader's inputs: the UI format
# stores widget values by position, so saved workflows keep theirs.
ADDED = {
    "strategy": (["manual", "auto"], {
        "default": "manual",
        "tooltip": "auto: the planner chooses dp, cfg, ring, ulysses, gpus_per_rank and offload for `ranks` devices "
                   "(GPUs on CUDA, rank processes on CPU) and says why in the plan output; a setting changed from "
                   "its default (dp 0, ring / ulysses / cfg / gpus_per_rank 1, offload resident) is kept and only "
                   "checked. The loader does not know the request yet, so it plans for the model's usual call "
                   "(Flux 1024², Qwen-Image 1024² with CFG and a negative prompt, Wan 832×480×81 with CFG; one "
                   "image), and ParallelDenoise checks each real request: one the layout cannot run or fit is "
                   "refused before the ranks start on it, and a much faster layout for it is named in the log and "
                   "the DistDiff panel. manual: the degrees as set; the plan output explains them."}),
    "gpus": ("STRING", {"default": "",
                        "tooltip": "Which GPUs the ranks use, e.g. 0,1,2,3 (CUDA indices as this ComfyUI sees them), "
                                   "in rank order; list exactly ranks × gpus_per_rank of them. Empty = GPUs 0 … "
                                   "ranks × gpus_per_rank − 1. Leave ComfyUI's own GPU out of the list to keep it "
                                   "free."}),
}

NAMES = (*REQUIRED, *OPTIONAL, *ADDED)


def split(kwargs: dict) -> tuple[dict, dict]:
    """(the parallel settings, everything else) of a node's keyword arguments."""
    return ({k: v for k, v in kwargs.items() if k in NAMES}, {k: v for k, v in kwargs.items() if k not in NAMES})


def _resolved(settings: dict) -> dict:
    """The settings with defaults for optional ones not given, and device / dtype resolved."""
    s = {**{k: spec[1]["default"] for k, spec in {**OPTIONAL, **ADDED}.items()}, **settings}
    if s["device"] == "auto":
        import torch

        s["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if s["device"] == "cpu" and s["dtype"] == "float16":
        s["dtype"] = "bfloat16"  # the node default is for GPUs; CPU kernels want bf16/fp32
    return s


def session_config(settings: dict):
    """The SessionConfig of the parallel settings (defaults for optional ones not given); validated there."""
    from ..dist_backend.config import SessionConfig

    s = _resolved(settings)
    return SessionConfig(world_size=s["ranks"], dp=s["dp"], ring=s["ring"], ulysses=s["ulysses"], device=s["device"],
                         dtype=s["dtype"], offload=s["offload"], gpus_per_rank=s["gpus_per_rank"],
                         gpu_ids=s["gpus"], device_map=s["device_map"], max_memory=s["max_memory"].strip(),
                         attention_backend=s["attention_backend"].strip(), cfg=s["cfg"], compile=s["compile"],
                         cache=s["cache"], cache_threshold=s["cache_threshold"])


def planned_config(settings: dict, *, facts, weights: str = "bf16", per_node: tuple[int, ...] = ()):
    """(SessionConfig, LoaderPlan) of the parallel settings: with strategy auto the planner fills what was left
    at its default; with manual the settings are used as given and the plan explains them. `facts` is a
    callable giving the model's ModelFacts (read only when needed); `weights` is how the transformer is stored
    ("bf16", or "fp8" for single files loaded with weights fp8); `per_node` the devices of each machine when the
    ranks span several (a cluster's ranks per node, in rank order)."""
    from ..dist_backend.config import SessionConfig, parse_gpu_ids
    from ..dist_backend.planning.auto import Strategy, plan_loader
    from ..dist_backend.planning.layout import Hand, session_kwargs

    s = _resolved(settings)
    strategy = Strategy(s["strategy"])
    if strategy is Strategy.MANUAL:
        config = session_config(settings)  # validated first: a manual layout's own errors come from the engine
        hand = Hand(dp=config.dp, cfg=config.cfg, ring=config.ring, ulysses=config.ulysses,
                    gpus_per_rank=config.gpus_per_rank, offload=config.offload, weights=weights)
        count = config.world_size * (config.gpus_per_rank if config.device.value == "cuda" else 1)
        return config, plan_loader(facts=facts, strategy=strategy, device=config.device.value, count=count,
                                   hand=hand, per_node=per_node, gpu_ids=config.gpu_ids)
    defaults = {"dp": 0, "cfg": 1, "ring": 1, "ulysses": 1, "gpus_per_rank": 1, "offload": "resident"}
    hand = {k: s[k] for k, default in defaults.items() if s[k] != default}
    if s["device"] != "cuda":
        hand["gpus_per_rank"] = 1  # CPU ranks have no device_map sharding
    if per_node:
        hand["gpus_per_rank"] = 1  # a cluster counts ranks per machine: one device each
    gpu_ids = parse_gpu_ids(s["gpus"]) if s["device"] == "cuda" else ()  # on CPU SessionConfig refuses gpus
    loader_plan = plan_loader(facts=facts, strategy=strategy, device=s["device"], count=len(gpu_ids) or s["ranks"],
                              hand=Hand(**hand, weights=weights), per_node=per_node, gpu_ids=gpu_ids)
    kwargs = session_kwargs(loader_plan.plan, device=s["device"], dtype=s["dtype"])
    if loader_plan.plan.gpus_per_rank > 1 and s["device_map"] != "none":
        kwargs["device_map"] = s["device_map"]
    config = SessionConfig(**kwargs, max_memory=s["max_memory"].strip() if loader_plan.plan.gpus_per_rank > 1 else "",
                           attention_backend=s["attention_backend"].strip(), compile=s["compile"], cache=s["cache"],
                           cache_threshold=s["cache_threshold"], gpu_ids=s["gpus"])
    return config, loader_plan


def loader_session(settings: dict, *, facts, weights: str = "bf16"):
    """(SessionConfig, LoaderPlan, ClusterConfig or None, Session) for a loader node: the layout planned or checked
    (`planned_config`) over the cluster named by the node's inputs or cluster.json, and the sidecar for it (started
    or reused), the plan on its status board."""
    from ..dist_backend.session import get_session
    from . import cluster_inputs

    cluster = cluster_inputs.cluster_config(settings)
    per_node = () if cluster is None else tuple(n.nproc for n in cluster.spec.nodes)
    config, plan = planned_config(settings, facts=facts, weights=weights, per_node=per_node)
    config = cluster_inputs.with_cluster(config, cluster)
    session = get_session(config, cluster=cluster)
    session.status.set_plan(plan.summary())
    return config, plan, cluster, session

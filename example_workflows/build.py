"""Writes every example workflow in both ComfyUI formats from one spec: `python example_workflows/build.py`.

API format (`*.api.json`) is what scripts POST to /prompt; UI format (`*.json`) is what the graph editor opens
and people share. A test checks the committed files equal what this script writes, and runs every API file on a
real ComfyUI host.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY_MODEL = "distdiff-tiny-flux"  # tests put the tiny Flux pipeline under this name in models/diffusers
# The interop examples need a pipeline whose VAE ComfyUI's own Load VAE can load (the real FLUX.1 architecture):
# tests put such a tiny pipeline under this name in models/diffusers, and its VAE file in models/vae.
REAL_VAE_MODEL = "distdiff-tiny-flux-realvae"
REAL_VAE_FILE = "distdiff-tiny-flux-realvae.safetensors"
INPUT_IMAGE = "distdiff_example.png"  # tests put a 64 × 64 picture under this name in ComfyUI's input folder
# Tests put tiny LoRAs for that pipeline under these names in models/loras (tests/lora_fixtures.py).
TINY_LORAS = {"peft": "distdiff-tiny-flux-peft.safetensors", "kohya": "distdiff-tiny-flux-kohya.safetensors"}
# Tests put the tiny Flux as single files under these names in models/diffusion_models, text_encoders and vae
# (dist_backend/files/tiny_files.py); a real workflow names flux1-dev.safetensors, clip_l, t5xxl_fp16, ae.
TINY_FILES = {"diffusion_model": "distdiff-tiny-flux1.safetensors", "text_encoder_1": "distdiff-tiny-clip_l.safetensors",
              "text_encoder_2": "distdiff-tiny-t5xxl.safetensors", "vae": "distdiff-tiny-ae.safetensors"}

# Widget inputs of each node in INPUT_TYPES order (required, then optional): the UI format stores values by
# position. "seed" is followed by ComfyUI's control_after_generate value.
WIDGETS = {
    "LoadSharded": ["model", "ranks", "dp", "ring", "ulysses", "device", "dtype", "offload", "gpus_per_rank",
                    "device_map", "max_memory", "attention_backend", "cfg", "compile", "cache", "cache_threshold",
                    "model_path", "strategy", "gpus", "cluster", "listen", "token_file"],
    "EncodeOnGPUs": ["prompt", "negative_prompt"],
    "ParallelDenoise": ["seed", "images_per_prompt", "steps", "guidance", "width", "height", "num_frames",
                        "denoise", "true_cfg", "guidance_2"],
    "DecodeVAE": [],
    "SaveImage": ["filename_prefix"],
    "LoadImage": ["image"],
    "VAELoader": ["vae_name"],
    "VAEEncode": [],
    "VAEDecode": [],
    "DistDiffLoRA": ["lora_name", "strength"],
}
# The loader of single files takes the same parallel settings as LoadSharded (nodes/parallel_inputs.py): those
# between its model and its model_path, the inputs added later (strategy, gpus) and the cluster ones.
_MODEL_PATH = WIDGETS["LoadSharded"].index("model_path")
PARALLEL = WIDGETS["LoadSharded"][1:_MODEL_PATH]
ADDED = WIDGETS["LoadSharded"][_MODEL_PATH + 1:_MODEL_PATH + 3]
CLUSTER = WIDGETS["LoadSharded"][_MODEL_PATH + 3:]
WIDGETS["DistDiffLoadFiles"] = ["family", "diffusion_model", "text_encoder_1", "text_encoder_2", "vae", "weights",
                                *PARALLEL, "tokenizers_path", "configs_path", "diffusion_model_2", *ADDED,
                                *CLUSTER]
OUTPUTS = {"LoadSharded": [("pipeline", "DISTDIFF_PIPELINE"), ("plan", "STRING")], "EncodeOnGPUs": [("conditioning", "DISTDIFF_CONDITIONING")],
           "ParallelDenoise": [("LATENT", "LATENT")], "DecodeVAE": [("IMAGE", "IMAGE")], "SaveImage": [],
           "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")], "VAELoader": [("VAE", "VAE")],
           "VAEEncode": [("LATENT", "LATENT")], "VAEDecode": [("IMAGE", "IMAGE")],
           "DistDiffLoRA": [("pipeline", "DISTDIFF_PIPELINE")], "DistDiffLoadFiles": [("pipeline", "DISTDIFF_PIPELINE"), ("plan", "STRING")]}
# A graph: its nodes in id order, and its links (node, input name) <- (source node, output slot, type).
OURS = {
    "order": ["LoadSharded", "EncodeOnGPUs", "ParallelDenoise", "DecodeVAE", "SaveImage"],
    "links": {
        ("EncodeOnGPUs", "pipeline"): ("LoadSharded", 0, "DISTDIFF_PIPELINE"),
        ("ParallelDenoise", "pipeline"): ("LoadSharded", 0, "DISTDIFF_PIPELINE"),
        ("ParallelDenoise", "conditioning"): ("EncodeOnGPUs", 0, "DISTDIFF_CONDITIONING"),
        ("DecodeVAE", "pipeline"): ("LoadSharded", 0, "DISTDIFF_PIPELINE"),
        ("DecodeVAE", "samples"): ("ParallelDenoise", 0, "LATENT"),
        ("SaveImage", "images"): ("DecodeVAE", 0, "IMAGE"),
    },
}
FILES = {  # the same graph, the model loaded from single files by DistDiffLoadFiles
    "order": ["DistDiffLoadFiles", *OURS["order"][1:]],
    "links": {target: (("DistDiffLoadFiles", *src[1:]) if src[0] == "LoadSharded" else src)
              for target, src in OURS["links"].items()},
}
IMG2IMG = {  # ComfyUI's Load Image -> Load VAE + VAE Encode -> our ParallelDenoise (denoise < 1) -> DecodeVAE
    "order": [*OURS["order"], "LoadImage", "VAELoader", "VAEEncode"],
    "links": {
        **OURS["links"],
        ("VAEEncode", "pixels"): ("LoadImage", 0, "IMAGE"),
        ("VAEEncode", "vae"): ("VAELoader", 0, "VAE"),
        ("ParallelDenoise", "latent"): ("VAEEncode", 0, "LATENT"),
    },
}
COMFY_DECODE = {  # our ParallelDenoise -> ComfyUI's own Load VAE + VAE Decode
    "order": ["LoadSharded", "EncodeOnGPUs", "ParallelDenoise", "SaveImage", "VAELoader", "VAEDecode"],
    "links": {
        ("EncodeOnGPUs", "pipeline"): ("LoadSharded", 0, "DISTDIFF_PIPELINE"),
        ("ParallelDenoise", "pipeline"): ("LoadSharded", 0, "DISTDIFF_PIPELINE"),
        ("ParallelDenoise", "conditioning"): ("EncodeOnGPUs", 0, "DISTDIFF_CONDITIONING"),
        ("VAEDecode", "samples"): ("ParallelDenoise", 0, "LATENT"),
        ("VAEDecode", "vae"): ("VAELoader", 0, "VAE"),
        ("SaveImage", "images"): ("VAEDecode", 0, "IMAGE"),
    },
}

BASE_LOAD = dict(model=TINY_MODEL, ranks=2, dp=0, ring=1, ulysses=1, device="cpu", dtype="float32",
                 offload="resident", gpus_per_rank=1, device_map="none", max_memory="", attention_backend="",
                 cfg=1, compile="none", cache="none", cache_threshold=0.0, model_path="", strategy="manual", gpus="",
                 cluster="", listen="", token_file="")
BASE_DENOISE = dict(seed=42, images_per_prompt=1, steps=4, guidance=3.5, width=64, height=64, num_frames=1,
                    denoise=1.0, true_cfg=1.0, guidance_2=-1.0)

# The strategies: our four nodes only, run on every host.
EXAMPLES = {
    "data_parallel": dict(load={}, prompt="a red fox in the snow\na lighthouse at dusk\na bowl of ramen",
                          note="3 prompts over 2 data-parallel ranks"),
    "ulysses": dict(load=dict(ulysses=2), prompt="a red fox in the snow", note="2-rank Ulysses attention"),
    "ring": dict(load=dict(ring=2), prompt="a red fox in the snow", note="2-rank Ring attention"),
    "device_map_staged": dict(load=dict(ranks=1, offload="staged"), prompt="a red fox in the snow",
                              note="staged load/free (on GPUs: gpus_per_rank=2, device_map=balanced)"),
    "hybrid_dp_ulysses": dict(load=dict(ranks=4, ulysses=2), prompt="a red fox in the snow\na lighthouse at dusk",
                              note="4 ranks = 2 data-parallel groups × 2 Ulysses"),
    "cfg_parallel": dict(load=dict(cfg=2), prompt="a red fox in the snow", negative="blurry, low quality",
                         denoise=dict(true_cfg=2.0),
                         note="CFG parallel: prompt and negative-prompt branches on 2 ranks at once (Flux true CFG)"),
    "regional_compile": dict(load=dict(ulysses=2, compile="regional"), prompt="a red fox in the snow",
                             note="Ulysses on 2 ranks with the transformer's repeated block torch.compiled once"),
    "step_cache": dict(load=dict(ulysses=2, cache="first_block", cache_threshold=0.3), prompt="a red fox in the snow",
                       note="Ulysses on 2 ranks with diffusers' first-block cache, decided over the CP group"),
    "auto_plan": dict(load=dict(strategy="auto"), prompt="a red fox in the snow",
                      note="strategy auto: the planner chooses the layout of the 2 ranks (Ulysses 2 for one image) "
                           "and explains it on LoadSharded's plan output (wire it to Preview as Text)"),
    "lora_chain": dict(load=dict(ulysses=2), prompt="a red fox in the snow",
                       loras=[(TINY_LORAS["peft"], 0.8), (TINY_LORAS["kohya"], -0.6)],
                       note="two chained LoRA (DistDiff) nodes (a diffusers/PEFT and a kohya file, one negative) "
                            "under 2-rank Ulysses"),
    "single_files": dict(graph=FILES, load=dict(ulysses=2), prompt="a red fox in the snow",
                         note="Flux from the single files ComfyUI users keep (diffusion_models / text_encoders / vae; "
                              "fp8 files too) under 2-rank Ulysses; tokenizers from this ComfyUI, architecture from "
                              "the configs shipped with the pack"),
}
# Our nodes with ComfyUI's own (a host with Flux-era nodes, and a model whose VAE ComfyUI's Load VAE reads).
INTEROP_EXAMPLES = {
    "img2img": dict(graph=IMG2IMG, load=dict(model=REAL_VAE_MODEL, ulysses=2), prompt="a red fox in the snow",
                    denoise=dict(denoise=0.6),
                    note="Load Image -> VAE Encode -> ParallelDenoise at denoise 0.6 (image-to-image, 2-rank "
                         "Ulysses); the LATENT is ComfyUI's own, so any VAE Encode of this model's VAE fits"),
    "comfy_vae_decode": dict(graph=COMFY_DECODE, load=dict(model=REAL_VAE_MODEL), prompt="a lighthouse at dusk",
                             note="ParallelDenoise's LATENT decoded by ComfyUI's own Load VAE + VAE Decode"),
}


def graph_of(example: dict) -> dict:
    """The example's graph ({"order": node keys, "links": ...}); its LoRA nodes (keys "DistDiffLoRA#1", ...) go
    between LoadSharded and every node that takes the pipeline."""
    base = example.get("graph", OURS)
    loras = [f"DistDiffLoRA#{i + 1}" for i in range(len(example.get("loras", ())))]
    if not loras:
        return base
    links, source = {}, "LoadSharded"
    for key in loras:
        links[(key, "pipeline")] = (source, 0, "DISTDIFF_PIPELINE")
        source = key
    for (target, input_name), (src, slot, typ) in base["links"].items():
        links[(target, input_name)] = (source if typ == "DISTDIFF_PIPELINE" else src, slot, typ)
    order = base["order"]
    return {"order": [order[0], *loras, *order[1:]], "links": links}


def node_id(example: dict, key: str) -> str:
    return str(graph_of(example)["order"].index(key) + 1)


def class_of(key: str) -> str:
    return key.split("#")[0]


def node_values(name: str, example: dict) -> dict:
    if class_of(name) == "DistDiffLoRA":
        lora_name, strength = example["loras"][int(name.split("#")[1]) - 1]
        return {"lora_name": lora_name, "strength": strength}
    if name == "LoadSharded":
        return {**BASE_LOAD, **example["load"]}
    if name == "DistDiffLoadFiles":
        load = {**BASE_LOAD, **example["load"]}
        return {"family": "flux", **TINY_FILES, "weights": "default", **{k: load[k] for k in PARALLEL},
                "tokenizers_path": "", "configs_path": "", "diffusion_model_2": "none", **{k: load[k] for k in (*ADDED, *CLUSTER)}}
    if name == "EncodeOnGPUs":
        return {"prompt": example["prompt"], "negative_prompt": example.get("negative", "")}
    if name == "ParallelDenoise":
        return {**BASE_DENOISE, **example.get("denoise", {})}
    if name == "SaveImage":
        return {"filename_prefix": "distdiff"}
    if name == "LoadImage":
        return {"image": INPUT_IMAGE}
    if name == "VAELoader":
        return {"vae_name": REAL_VAE_FILE}
    return {}


def api_format(example: dict) -> dict:
    graph, prompt = graph_of(example), {}
    for name in graph["order"]:
        inputs = dict(node_values(name, example))
        for (target, input_name), (source, slot, _) in graph["links"].items():
            if target == name:
                inputs[input_name] = [node_id(example, source), slot]
        prompt[node_id(example, name)] = {"class_type": class_of(name), "inputs": inputs,
                                          "_meta": {"title": class_of(name)}}
    return prompt


def ui_format(example: dict) -> dict:
    graph = graph_of(example)
    links, nodes = [], []
    for link_id, ((target, input_name), (source, slot, typ)) in enumerate(graph["links"].items(), start=1):
        links.append([link_id, int(node_id(example, source)), slot, int(node_id(example, target)), None, typ,
                      input_name])
    for order, name in enumerate(graph["order"]):
        values = node_values(name, example)
        widgets = []
        for w in WIDGETS[class_of(name)]:
            widgets.append(values[w])
            if w == "seed":
                widgets.append("fixed")
        inputs = []
        for link in links:
            if link[3] == int(node_id(example, name)):
                link[4] = len(inputs)
                inputs.append({"name": link[6], "type": link[5], "link": link[0]})
        outputs = [{"name": out_name, "type": typ, "slot_index": i,
                    "links": [l[0] for l in links if l[1] == int(node_id(example, name)) and l[2] == i]}
                   for i, (out_name, typ) in enumerate(OUTPUTS[class_of(name)])]
        nodes.append({"id": int(node_id(example, name)), "type": class_of(name), "pos": [60 + 340 * order, 120],
                      "size": [320, 260], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": outputs, "properties": {"Node name for S&R": class_of(name)}, "widgets_values": widgets})
    return {"last_node_id": len(graph["order"]), "last_link_id": len(links), "nodes": nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {},
            "extra": {"distdiff_note": example["note"]}, "version": 0.4}


def render() -> dict[str, str]:
    files = {}
    for name, example in {**EXAMPLES, **INTEROP_EXAMPLES}.items():
        files[f"{name}.api.json"] = json.dumps(api_format(example), indent=2) + "\n"
        files[f"{name}.json"] = json.dumps(ui_format(example), indent=2) + "\n"
    return files


if __name__ == "__main__":
    for filename, text in render().items():
        (HERE / filename).write_text(text)
        print(filename)

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

# Widget inputs of each node in INPUT_TYPES order (required, then optional): the UI format stores values by
# position. "seed" is followed by ComfyUI's control_after_generate value.
WIDGETS = {
    "LoadSharded": ["model", "ranks", "dp", "ring", "ulysses", "device", "dtype", "offload", "gpus_per_rank",
                    "device_map", "max_memory", "attention_backend", "model_path"],
    "EncodeOnGPUs": ["prompt", "negative_prompt"],
    "ParallelDenoise": ["seed", "images_per_prompt", "steps", "guidance", "width", "height", "num_frames", "true_cfg",
                        "guidance_2"],
    "DecodeVAE": [],
    "SaveImage": ["filename_prefix"],
}
LINKS = {  # (node, input name) <- (source node, output slot, type)
    ("EncodeOnGPUs", "pipeline"): ("LoadSharded", 0, "DISTDIFF_PIPELINE"),
    ("ParallelDenoise", "pipeline"): ("LoadSharded", 0, "DISTDIFF_PIPELINE"),
    ("ParallelDenoise", "conditioning"): ("EncodeOnGPUs", 0, "DISTDIFF_CONDITIONING"),
    ("DecodeVAE", "pipeline"): ("LoadSharded", 0, "DISTDIFF_PIPELINE"),
    ("DecodeVAE", "samples"): ("ParallelDenoise", 0, "LATENT"),
    ("SaveImage", "images"): ("DecodeVAE", 0, "IMAGE"),
}
OUTPUTS = {"LoadSharded": [("pipeline", "DISTDIFF_PIPELINE")], "EncodeOnGPUs": [("conditioning", "DISTDIFF_CONDITIONING")],
           "ParallelDenoise": [("LATENT", "LATENT")], "DecodeVAE": [("IMAGE", "IMAGE")], "SaveImage": []}
ORDER = ["LoadSharded", "EncodeOnGPUs", "ParallelDenoise", "DecodeVAE", "SaveImage"]
NODE_ID = {name: str(i + 1) for i, name in enumerate(ORDER)}

BASE_LOAD = dict(model=TINY_MODEL, ranks=2, dp=0, ring=1, ulysses=1, device="cpu", dtype="float32",
                 offload="resident", gpus_per_rank=1, device_map="none", max_memory="", attention_backend="",
                 model_path="")
BASE_DENOISE = dict(seed=42, images_per_prompt=1, steps=4, guidance=3.5, width=64, height=64, num_frames=1,
                    true_cfg=1.0, guidance_2=-1.0)

EXAMPLES = {
    "data_parallel": dict(load={}, prompt="a red fox in the snow\na lighthouse at dusk\na bowl of ramen",
                          note="3 prompts over 2 data-parallel ranks"),
    "ulysses": dict(load=dict(ulysses=2), prompt="a red fox in the snow", note="2-rank Ulysses attention"),
    "ring": dict(load=dict(ring=2), prompt="a red fox in the snow", note="2-rank Ring attention"),
    "device_map_staged": dict(load=dict(ranks=1, offload="staged"), prompt="a red fox in the snow",
                              note="staged load/free (on GPUs: gpus_per_rank=2, device_map=balanced)"),
    "hybrid_dp_ulysses": dict(load=dict(ranks=4, ulysses=2), prompt="a red fox in the snow\na lighthouse at dusk",
                              note="4 ranks = 2 data-parallel groups × 2 Ulysses"),
}


def node_values(name: str, example: dict) -> dict:
    if name == "LoadSharded":
        return {**BASE_LOAD, **example["load"]}
    if name == "EncodeOnGPUs":
        return {"prompt": example["prompt"], "negative_prompt": ""}
    if name == "ParallelDenoise":
        return dict(BASE_DENOISE)
    if name == "SaveImage":
        return {"filename_prefix": "distdiff"}
    return {}


def api_format(example: dict) -> dict:
    prompt = {}
    for name in ORDER:
        inputs = dict(node_values(name, example))
        for (target, input_name), (source, slot, _) in LINKS.items():
            if target == name:
                inputs[input_name] = [NODE_ID[source], slot]
        prompt[NODE_ID[name]] = {"class_type": name, "inputs": inputs, "_meta": {"title": name}}
    return prompt


def ui_format(example: dict) -> dict:
    links, nodes = [], []
    for link_id, ((target, input_name), (source, slot, typ)) in enumerate(LINKS.items(), start=1):
        links.append([link_id, int(NODE_ID[source]), slot, int(NODE_ID[target]), None, typ, input_name])
    for order, name in enumerate(ORDER):
        values = node_values(name, example)
        widgets = []
        for w in WIDGETS[name]:
            widgets.append(values[w])
            if w == "seed":
                widgets.append("fixed")
        inputs = []
        for link in links:
            if link[3] == int(NODE_ID[name]):
                link[4] = len(inputs)
                inputs.append({"name": link[6], "type": link[5], "link": link[0]})
        outputs = [{"name": out_name, "type": typ, "slot_index": i,
                    "links": [l[0] for l in links if l[1] == int(NODE_ID[name]) and l[2] == i]}
                   for i, (out_name, typ) in enumerate(OUTPUTS[name])]
        nodes.append({"id": int(NODE_ID[name]), "type": name, "pos": [60 + 340 * order, 120], "size": [320, 260],
                      "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": name}, "widgets_values": widgets})
    return {"last_node_id": len(ORDER), "last_link_id": len(links), "nodes": nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {},
            "extra": {"distdiff_note": example["note"]}, "version": 0.4}


def render() -> dict[str, str]:
    files = {}
    for name, example in EXAMPLES.items():
        files[f"{name}.api.json"] = json.dumps(api_format(example), indent=2) + "\n"
        files[f"{name}.json"] = json.dumps(ui_format(example), indent=2) + "\n"
    return files


if __name__ == "__main__":
    for filename, text in render().items():
        (HERE / filename).write_text(text)
        print(filename)

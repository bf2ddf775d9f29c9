"""DistDiffLoRA: add one LoRA (file + strength) to the pipeline; chain several. The ranks apply the set with
diffusers' own LoRA loaders when a stage next runs."""

from __future__ import annotations

import dataclasses

from .common import CATEGORY, PIPELINE, lora_names, resolve_lora


class DistDiffLoRA:
    DESCRIPTION = ("Applies a LoRA to the pipeline on every rank, with diffusers' own loaders (diffusers/PEFT, kohya "
                   "and the other layouts diffusers reads for the family). Chain several; changing a strength or "
                   "the set swaps adapters without reloading the model, and a pipeline without LoRA nodes gives "
                   "the base model's exact image.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "From LoadSharded or another LoRA (DistDiff) node."}),
                "lora_name": (lora_names() or ["(put LoRA .safetensors files in models/loras)"],
                              {"tooltip": "A LoRA .safetensors file in models/loras, made for this model family."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Adapter weight; negative inverts the LoRA, 0 leaves it out."}),
            },
        }

    def apply(self, pipeline, lora_name, strength):
        from ..dist_backend.lora import lora_specs

        path = resolve_lora(lora_name)
        lora_specs([(path, strength)])  # a bad file is this node's error, not the next stage's
        return (dataclasses.replace(pipeline, loras=(*pipeline.loras, (path, float(strength)))),)

"""DistDiffLoadFiles: a model as ComfyUI users keep it (one file per part in models/diffusion_models, text_encoders
and vae), with the same parallel settings as LoadSharded; outputs the same DISTDIFF_PIPELINE."""

from __future__ import annotations

from . import cluster_inputs, parallel_inputs
from .common import (CATEGORY, PIPELINE, PLAN_OUTPUT, PipelineHandle, comfy_should_cancel, files_fingerprint,
                     run_cancellable)

NONE = "none"
# ComfyUI's folder names for each kind of file; older ComfyUI versions know only the second of a pair.
_FOLDERS = {"diffusion": ("diffusion_models", "unet"), "text": ("text_encoders", "clip"), "vae": ("vae",)}


def _folders(kind: str) -> list[str]:
    import folder_paths

    return [f for f in _FOLDERS[kind] if f in folder_paths.folder_names_and_paths]


def list_files(kind: str) -> list[str]:
    import folder_paths

    names = {n for f in _folders(kind) for n in folder_paths.get_filename_list(f) if n.endswith(".safetensors")}
    return sorted(names)


def full_path(kind: str, name: str) -> str:
    import folder_paths

    from ..dist_backend.errors import ModelError

    for folder in _folders(kind):
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    raise ModelError(f"{name!r} is not in any of ComfyUI's {' / '.join(_FOLDERS[kind])} model folders; "
                     "put the file there (or refresh the node list)")


def comfy_root() -> str:
    """The running ComfyUI's folder: its comfy/ folder bundles the CLIP, T5 and Qwen tokenizers."""
    import os

    import comfy

    # Not comfy.__file__: ComfyUI 0.33's comfy is a namespace package (no __init__.py), whose __file__ is None.
    return os.path.dirname(os.path.abspath(list(comfy.__path__)[0]))


class LoadFiles:
    DESCRIPTION = ("Loads a model from the single files ComfyUI's own templates use (diffusion model, text "
                   "encoders, VAE; fp16, fp8 or ComfyUI's scaled fp8) on the rank sidecar, with the same parallel "
                   "settings as Load Sharded. Each rank memory-maps the files; nothing is converted on disk. "
                   "Supported families: flux, qwenimage, wan (Wan 2.1 T2V; Wan 2.2 A14B with diffusion_model_2).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE, PLAN_OUTPUT[0])  # appended, never inserted: API workflows link outputs by index
    RETURN_NAMES = ("pipeline", PLAN_OUTPUT[1])
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from ..dist_backend.pipelines import Family

        diffusion = list_files("diffusion") or ["(put files in models/diffusion_models)"]
        text = list_files("text") or ["(put files in models/text_encoders)"]
        vae = list_files("vae") or ["(put files in models/vae)"]
        return {
            "required": {
                "family": ([f.value for f in Family], {"default": "flux", "tooltip": "The model family of the files."}),
                "diffusion_model": (diffusion, {"tooltip": "The diffusion model (Flux: flux1-dev.safetensors; "
                                                           "Qwen-Image: qwen_image_fp8_e4m3fn / qwen_image_bf16; Wan: "
                                                           "wan2.1_t2v_*.safetensors, or Wan 2.2's high-noise expert)."}),
                "text_encoder_1": (text, {"tooltip": "The first text encoder (Flux: clip_l.safetensors; Qwen-Image: "
                                                     "qwen_2.5_vl_7b[_fp8_scaled]; Wan: umt5_xxl_fp16 / "
                                                     "umt5_xxl_fp8_e4m3fn_scaled)."}),
                "text_encoder_2": ([NONE, *text], {"default": NONE,
                                                   "tooltip": "The second text encoder where the family has two "
                                                              "(Flux: t5xxl_fp16 / t5xxl_fp8_e4m3fn); none otherwise."}),
                "vae": (vae, {"tooltip": "The VAE (Flux: ae.safetensors; Qwen-Image: qwen_image_vae.safetensors; Wan: "
                                         "wan_2.1_vae.safetensors)."}),
                "weights": (["default", "fp8"], {"default": "default",
                                                 "tooltip": "default: the transformer in the compute dtype (fp8 files "
                                                            "are dequantised). fp8: kept in float8 and upcast per layer "
                                                            "(about half the memory, a little slower)."}),
                **parallel_inputs.REQUIRED,
            },
            "optional": {
                **parallel_inputs.OPTIONAL,
                "tokenizers_path": ("STRING", {"default": "",
                                               "tooltip": "Folder with the tokenizers (a diffusers folder or a ComfyUI "
                                                          "install); empty = this ComfyUI's bundled tokenizers."}),
                "configs_path": ("STRING", {"default": "",
                                            "tooltip": "A diffusers-layout folder whose config.json files describe the "
                                                       "architecture; empty = the configs shipped for the model."}),
                # After the first release's inputs: saved UI workflows list widget values by position.
                "diffusion_model_2": ([NONE, *list_files("diffusion")], {
                    "default": NONE, "tooltip": "Wan 2.2 A14B's second diffusion model (the low-noise expert; "
                                                "diffusion_model is the high-noise one); none otherwise."}),
                **parallel_inputs.ADDED,
                **cluster_inputs.OPTIONAL,  # last: saved workflows list widget values by position
            },
        }

    @classmethod
    def IS_CHANGED(cls, diffusion_model, text_encoder_1, text_encoder_2, vae, diffusion_model_2=NONE, **kwargs):
        # As LoadSharded.IS_CHANGED: the output changes with the inputs and the files' contents, not the sidecar.
        try:
            return files_fingerprint([full_path("diffusion", diffusion_model), full_path("text", text_encoder_1),
                                      full_path("vae", vae),
                                      *([full_path("text", text_encoder_2)] if text_encoder_2 != NONE else []),
                                      *([full_path("diffusion", diffusion_model_2)] if diffusion_model_2 != NONE
                                        else [])]) + cluster_inputs.file_fingerprint()
        except Exception:  # noqa: BLE001 - a missing file: load() raises the clear ModelError
            return float("nan")

    def load(self, family, diffusion_model, text_encoder_1, text_encoder_2, vae, weights, tokenizers_path="",
             configs_path="", diffusion_model_2=NONE, **settings):
        from ..dist_backend.files import ModelFiles, files_configs_dir
        from ..dist_backend.planning.model_facts import read_model_facts

        files = ModelFiles(
            family=family, transformer=full_path("diffusion", diffusion_model),
            text_encoder=full_path("text", text_encoder_1), vae=full_path("vae", vae),
            text_encoder_2=full_path("text", text_encoder_2) if text_encoder_2 != NONE else "",
            transformer_2=full_path("diffusion", diffusion_model_2) if diffusion_model_2 != NONE else "",
            tokenizers=tokenizers_path.strip() or comfy_root(), configs=configs_path.strip(),
            weights="fp8" if weights == "fp8" else "compute",
        )
        # The planner reads the architecture configs the files are checked against (no weight is read).
        config, plan, cluster, session = parallel_inputs.loader_session(
            settings, facts=lambda: read_model_facts(files_configs_dir(files)),
            weights="fp8" if weights == "fp8" else "bf16")
        info = run_cancellable(lambda: session.load(files, should_cancel=comfy_should_cancel()))
        return (PipelineHandle(config=config, model_dir=info["model_dir"], family=info["family"], files=files,
                               plan=plan, cluster=cluster), plan.text)

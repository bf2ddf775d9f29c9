"""Wan files on the host, from their headers alone: which shipped architecture config a transformer file is
(`shipped_wan_model`), and the few shapes that must agree with the configs (`wan_shape_checks`). No torch."""

from __future__ import annotations

from ..errors import ModelError
from .detect import FileInfo, count_blocks
from .wan_vae_layout import vae_shape_checks

SPIECE_KEY = "spiece_model"  # ComfyUI's text-encoder files carry their sentencepiece model as a uint8 tensor
# Transformer width -> the shipped configs (pipelines/configs/<name>) of the text-to-video models. Their architecture
# configs are the Wan-AI diffusers repositories' (tests/data/models); the schedulers are UniPC in flow mode with the
# authors' shift: 3.0 for Wan 2.1 (480p), 12.0 for Wan 2.2 T2V A14B (its sample_shift; boundary_ratio 0.875).
_WAN_BY_WIDTH = {1536: "wan2.1-t2v-1.3b", 5120: "wan2.1-t2v-14b"}
_T2V_CHANNELS = 16  # latent channels in; image-to-video (36) and Wan 2.2 TI2V 5B (48) differ


def shipped_wan_model(infos: dict[str, FileInfo]) -> str:
    t = infos["transformer"]
    shape = t.shapes.get("patch_embedding.weight") or (None, None)
    width, channels = shape[0], shape[1]
    if channels != _T2V_CHANNELS:
        raise ModelError(f"{t.path!r} is a Wan model with {channels} input channels; single files are supported for "
                         f"the text-to-video models ({_T2V_CHANNELS}: Wan 2.1 T2V 1.3B / 14B, Wan 2.2 T2V A14B). "
                         "Load image-to-video and TI2V models from a diffusers folder")
    if width not in _WAN_BY_WIDTH:
        raise ModelError(f"{t.path!r} is a Wan transformer of width {width}, which has no shipped config (known: "
                         f"{', '.join(f'{w} = {n}' for w, n in _WAN_BY_WIDTH.items())}); give configs = a diffusers "
                         "folder of this model")
    if "transformer_2" in infos:  # two experts: Wan 2.2 A14B (each of them the 14B architecture)
        if width != 5120:
            raise ModelError(f"{t.path!r} and {infos['transformer_2'].path!r} are two Wan experts of width {width}; "
                             "the shipped two-expert config is Wan 2.2 T2V A14B (width 5120). Give configs = a "
                             "diffusers folder of this model")
        return "wan2.2-t2v-a14b"
    return _WAN_BY_WIDTH[width]


def _first(shapes: dict, *names: str):
    return next((shapes[n] for n in names if n in shapes), None)


def wan_shape_checks(infos: dict[str, FileInfo], components: dict) -> list[tuple[FileInfo, str, object, object]]:
    """(file, what, found in the file, what the config says) for every Wan part given."""
    checks = []
    for part in ("transformer", "transformer_2"):
        if part not in infos:
            continue
        t, cfg = infos[part], components[part]
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        checks += [
            (t, "patch_embedding.weight shape", t.shapes.get("patch_embedding.weight"),
             (inner, cfg["in_channels"], *cfg["patch_size"])),
            (t, "number of blocks", count_blocks(t.shapes, "blocks"), cfg["num_layers"]),
            (t, "feed-forward weight shape",
             _first(t.shapes, "blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight"), (cfg["ffn_dim"], inner)),
            (t, "text embedding shape",
             _first(t.shapes, "text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight"),
             (inner, cfg["text_dim"])),
        ]
    e, ecfg = infos["text_encoder"], components["text_encoder"]
    return [
        *checks,
        *vae_shape_checks(infos["vae"], components["vae"]),
        (e, "shared embedding shape", e.shapes.get("shared.weight"), (ecfg["vocab_size"], ecfg["d_model"])),
        (e, "number of blocks", count_blocks(e.shapes, "encoder.block"), ecfg["num_layers"]),
    ]

"""Single-file models: detection from headers only (and each bad input of the issue), the Flux layout converter
against diffusers' own, and the assembled pipeline's weights against the diffusers folder's."""

from __future__ import annotations

import pytest
import torch

from dist_backend.errors import ConfigError, ModelError
from dist_backend.files import ModelFiles, parse_files_arg, read_files_config
from dist_backend.files.detect import FileKind, inspect_file
from dist_backend.files.tiny_files import write_flux_files


@pytest.fixture(scope="module")
def files(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("single-files")
    return {storage: write_flux_files(tiny_dirs["flux"], root / storage, storage=storage, comfy_prefix=prefix)
            for storage, prefix in (("fp32", False), ("fp16", True), ("scaled_fp8", True))}


def flux(files, tiny_dirs, **overrides) -> ModelFiles:
    return ModelFiles(**{"family": "flux", "configs": str(tiny_dirs["flux"]), **files, **overrides})


def test_each_part_is_recognised_from_its_header(files):
    kinds = {part: inspect_file(path, role=part) for part, path in files["scaled_fp8"].items()}
    assert kinds["transformer"].kind is FileKind.FLUX_TRANSFORMER_BFL
    assert kinds["transformer"].prefix == "model.diffusion_model."
    assert kinds["transformer"].fp8 and kinds["transformer"].scaled_fp8
    assert kinds["text_encoder"].kind is FileKind.CLIP_TEXT and kinds["text_encoder"].prefix == "text_model."
    assert kinds["text_encoder_2"].kind is FileKind.T5_ENCODER and kinds["text_encoder_2"].scaled_fp8
    assert kinds["vae"].kind is FileKind.LDM_VAE and not kinds["vae"].fp8
    plain = inspect_file(files["fp32"]["transformer"], role="transformer")
    assert plain.prefix == "" and not plain.fp8 and not plain.scaled_fp8 and set(plain.dtypes) == {"F32"}
    assert set(inspect_file(files["fp16"]["vae"], role="vae").dtypes) == {"F16"}


def test_a_good_set_gives_the_planning_info_of_the_folder(files, tiny_dirs):
    from dist_backend.pipelines import read_model_config

    info = read_files_config(flux(files["fp16"], tiny_dirs))
    folder = read_model_config(tiny_dirs["flux"])
    assert info["family"] == folder["family"] and info["class_name"] == "FluxPipeline"
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        assert info["components"][name] == folder["components"][name]
    assert info["tokenizers"] == {"tokenizer": str(tiny_dirs["flux"] / "tokenizer"),
                                  "tokenizer_2": str(tiny_dirs["flux"] / "tokenizer_2")}


def test_a_vae_given_as_the_diffusion_model_is_refused_naming_the_file(files, tiny_dirs):
    with pytest.raises(ModelError) as err:
        read_files_config(flux(files["fp32"], tiny_dirs, transformer=files["fp32"]["vae"]))
    assert files["fp32"]["vae"] in str(err.value) and "expects a Flux transformer" in str(err.value)


def test_text_encoders_swapped_are_refused(files, tiny_dirs):
    with pytest.raises(ModelError, match="text_encoder file .* is a T5 text encoder, but flux expects a CLIP"):
        read_files_config(flux(files["fp32"], tiny_dirs, text_encoder=files["fp32"]["text_encoder_2"],
                               text_encoder_2=files["fp32"]["text_encoder"]))


def test_a_flux_file_with_family_qwenimage_is_refused_naming_the_file(files, tiny_dirs):
    with pytest.raises(ModelError) as err:
        read_files_config(ModelFiles(family="qwenimage", transformer=files["fp32"]["transformer"],
                                     text_encoder=files["fp32"]["text_encoder"], vae=files["fp32"]["vae"]))
    text = str(err.value)
    assert files["fp32"]["transformer"] in text and "is a Flux transformer" in text and "Qwen-Image transformer" in text


def test_a_truncated_file_is_refused_before_any_rank(files, tiny_dirs, tmp_path):
    data = open(files["fp32"]["transformer"], "rb").read()
    cut = tmp_path / "flux1-dev.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"flux1-dev\.safetensors' is truncated.*download it again"):
        read_files_config(flux(files["fp32"], tiny_dirs, transformer=str(cut)))
    cut.write_bytes(data[:5])
    with pytest.raises(ModelError, match="truncated"):
        read_files_config(flux(files["fp32"], tiny_dirs, transformer=str(cut)))


def test_a_missing_tokenizer_is_refused(files, tiny_dirs, tmp_path):
    (tmp_path / "comfy" / "sd1_tokenizer").mkdir(parents=True)
    (tmp_path / "comfy" / "sd1_tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no tokenizer_2 \(for text_encoder_2\) in .*t5_tokenizer"):
        read_files_config(flux(files["fp32"], tiny_dirs, tokenizers=str(tmp_path)))


def test_files_of_another_size_than_the_configs_are_refused(files):
    # No configs given: the shipped FLUX.1-dev configs are used, and the tiny transformer does not fit them.
    with pytest.raises(ModelError, match=r"does not match the architecture config in .*flux-dev.*img_in.weight shape"):
        read_files_config(ModelFiles(family="flux", **files["fp32"]))


def test_missing_and_extra_parts_are_config_errors(files, tiny_dirs):
    with pytest.raises(ConfigError, match="flux needs the second text encoder"):
        read_files_config(flux(files["fp32"], tiny_dirs, text_encoder_2=""))
    with pytest.raises(ConfigError, match="unknown family"):
        read_files_config(flux(files["fp32"], tiny_dirs, family="sdxl"))
    with pytest.raises(ConfigError, match="not PART=PATH"):
        parse_files_arg("transformer")
    assert parse_files_arg("transformer=/a.safetensors,vae=/b.safetensors") == {"transformer": "/a.safetensors",
                                                                                 "vae": "/b.safetensors"}


def test_our_flux_converter_equals_diffusers_on_the_real_row_counts():
    """diffusers' converter has FLUX.1's width (3072) built in; with one column per tensor the real row counts
    cost nothing, so both converters can be run on the same (BFL-layout) checkpoint."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from dist_backend.files.flux_layout import diffusers_to_flux, flux_to_diffusers

    with torch.device("meta"):
        names = list(FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True,
                                            attention_head_dim=8, num_attention_heads=2).state_dict())
    gen = torch.Generator().manual_seed(0)
    ours = {n: torch.randn(12288 if "proj_mlp" in n else 3072, 1, generator=gen) for n in names}
    bfl = diffusers_to_flux(ours)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    mine = flux_to_diffusers(dict(bfl))
    assert mine.keys() == theirs.keys() == ours.keys()
    assert all(torch.equal(mine[k], theirs[k]) and torch.equal(mine[k], ours[k]) for k in ours)


def test_assembled_weights_are_bit_identical_to_the_folder(files, tiny_dirs, tiny_pipes):
    from dist_backend.files.assemble import load_files_pipeline

    info = read_files_config(flux(files["fp32"], tiny_dirs))
    pipe = load_files_pipeline(info, components=info["models"], dtype=torch.float32)
    for name in info["models"]:
        want, got = getattr(tiny_pipes["flux"], name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
        assert not getattr(pipe, name).training


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell"])
def test_the_shipped_configs_describe_the_real_models(model):
    """Built on the meta device (no memory): the parameter counts of FLUX.1 and its encoders and VAE."""
    import json

    import transformers
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from dist_backend.files import CONFIGS_ROOT

    root = CONFIGS_ROOT / model
    cfg = {name: json.loads((root / name / "config.json").read_text())
           for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    with torch.device("meta"):
        models = {"transformer": FluxTransformer2DModel.from_config(cfg["transformer"]),
                  "vae": AutoencoderKL.from_config(cfg["vae"]),
                  "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text_encoder"])),
                  "text_encoder_2": transformers.T5EncoderModel(transformers.T5Config(**cfg["text_encoder_2"]))}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    # FLUX.1 [dev] 11.90 B (schnell has no guidance embedder), CLIP-L text 123.1 M, T5-XXL encoder 4.76 B,
    # the FLUX.1 VAE 83.8 M.
    assert round(counts["transformer"] / 1e9, 2) == (11.90 if model == "flux-dev" else 11.89)
    assert round(counts["text_encoder"] / 1e6, 1) == 123.1
    assert round(counts["text_encoder_2"] / 1e9, 2) == 4.76
    assert round(counts["vae"] / 1e6, 1) == 83.8


def test_diffusers_layout_files_load_too(tiny_dirs, tiny_pipes):
    """A folder's own component files used as single files: diffusers-layout transformer and VAE, a CLIP without
    the text_model. prefix (transformers 5 saves it so)."""
    from dist_backend.files.assemble import load_files_pipeline

    folder = tiny_dirs["flux"]
    parts = {"transformer": folder / "transformer" / "diffusion_pytorch_model.safetensors",
             "vae": folder / "vae" / "diffusion_pytorch_model.safetensors",
             "text_encoder": folder / "text_encoder" / "model.safetensors",
             "text_encoder_2": folder / "text_encoder_2" / "model.safetensors"}
    info = read_files_config(ModelFiles(family="flux", configs=str(folder), **{k: str(v) for k, v in parts.items()}))
    assert info["files"]["transformer"]["kind"] == "flux_transformer_diffusers"
    assert info["files"]["vae"]["kind"] == "diffusers_vae" and info["files"]["text_encoder"]["prefix"] == ""
    pipe = load_files_pipeline(info, components=["transformer", "vae", "text_encoder"], dtype=torch.float32)
    assert pipe.text_encoder_2 is None
    for name in ("transformer", "vae", "text_encoder"):
        want, got = getattr(tiny_pipes["flux"], name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


def test_the_host_check_reads_headers_only_without_torch(files, tiny_dirs):
    """read_files_config (what the host runs) never imports torch, so it cannot have loaded a weight."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from dist_backend.files import ModelFiles, read_files_config; "
            f"info = read_files_config(ModelFiles(**json.loads(sys.argv[1]))); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'fp8': info['files']['transformer']['scaled_fp8']}))")
    spec = flux(files["scaled_fp8"], tiny_dirs).to_message()
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, timeout=120,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"torch": False, "fp8": True}


def test_plan_and_generate_auto_read_the_configs_of_files_without_their_tokenizers(files, tiny_dirs, tmp_path):
    """`plan --files` and `generate --auto --files` plan from the configs that describe the files (headers only),
    as the same model given as a folder; they need no tokenizer (the loader does)."""
    import shutil

    from dist_backend.cli import build_parser
    from dist_backend.planning.command import auto_session_config, plan_from_args

    given = ",".join(f"{part}={path}" for part, path in files["fp32"].items())
    request = ["--gpus", "2", "--gpu-memory", "24GB", "--height", "64", "--width", "64", "--json"]
    parse = build_parser().parse_args
    source = ["--files", given, "--family", "flux", "--configs", str(tiny_dirs["flux"])]
    from_files = plan_from_args(parse(["plan", *source, *request])).to_dict()
    from_folder = plan_from_args(parse(["plan", "--model", str(tiny_dirs["flux"]), *request])).to_dict()
    assert from_files == from_folder and from_files["strategy"] == "ulysses2"

    configs = tmp_path / "configs"  # the folder's configs without its tokenizers or weights
    for path in tiny_dirs["flux"].rglob("*.json"):
        if not path.relative_to(tiny_dirs["flux"]).parts[0].startswith("tokenizer"):
            (configs / path.relative_to(tiny_dirs["flux"])).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, configs / path.relative_to(tiny_dirs["flux"]))
    with pytest.raises(ModelError, match="tokenizer"):  # what the loader needs, the planner does not
        read_files_config(flux(files["fp32"], tiny_dirs, configs=str(configs)))
    source = ["--files", given, "--family", "flux", "--configs", str(configs)]
    assert plan_from_args(parse(["plan", *source, *request])).strategy == "ulysses2"
    generate = ["generate", "--auto", *source, "--prompt", "a cat", "--out", "unused", "--height", "64", "--width",
                "64", "--world-size", "2"]
    config, chosen = auto_session_config(parse(generate))
    assert (config.ulysses, chosen.strategy) == (2, "ulysses2")
    with pytest.raises(ConfigError, match="--files needs --family"):
        plan_from_args(parse(["plan", "--files", given, *request]))

"""The device_map placement plan, tested with made-up per-GPU budgets: no machine here has two GPUs.

Sizes come from meta-device models (no memory allocated), so real Flux.1-dev / Wan dimensions cost nothing; the
tiny saved pipeline checks that the sizes equal what `from_pretrained` really loads and that the maps we hand
diffusers / transformers are in the form their loaders accept.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from dist_backend.errors import ConfigError
from dist_backend.planning.placement import (
    Stage, build_meta_model, cast_like_loader, component_sizes, format_max_memory, parse_max_memory, plan_placement,
    split_module, to_diffusers_kwargs,
)
from dist_backend.planning.meta_sizes import module_bytes

GB = 10**9
FLUX_STAGES = {"text_encoder": "encode", "text_encoder_2": "encode", "tokenizer": "encode", "tokenizer_2": "encode",
               "transformer": "denoise", "vae": "decode"}
# Flux.1-dev's components in bf16 (CLIP-L, T5-XXL encoder, the transformer is measured below, the VAE).
FLUX_SIZES = {"text_encoder": 246_144_352, "text_encoder_2": 9_524_621_312, "transformer": 23_802_816_640,
              "vae": 167_666_902}


def loaded_bytes(model: torch.nn.Module) -> int:
    """What a loaded model really holds: every parameter and buffer tensor once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bytes_per_gpu(model: torch.nn.Module, device_map: dict) -> dict:
    """Independent of accelerate: resolve each parameter by its longest listed prefix, as diffusers loads it."""
    used: dict = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        path = name
        while path not in device_map:
            assert path, f"{name} has no device"
            path = path.rpartition(".")[0]
        used[device_map[path]] = used.get(device_map[path], 0) + tensor.numel() * tensor.element_size()
    return used


@pytest.fixture(scope="module")
def flux_dev_meta():
    """Flux.1-dev's transformer (11.9B parameters) on the meta device, cast as a bf16 load casts it."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
    return cast_like_loader(model, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    """A Flux-layout folder with random tiny weights; tokenizers and scheduler are listed but hold no weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("tiny_flux")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                 bos_token_id=0, eos_token_id=2)).save_pretrained(root / "text_encoder")
    T5EncoderModel(T5Config(d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8, vocab_size=1000)
                   ).save_pretrained(root / "text_encoder_2")
    FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           axes_dims_rope=(4, 6, 6)).save_pretrained(root / "transformer")
    AutoencoderKL(block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2,
                  layers_per_block=1).save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return root


# -- max_memory text ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("0=16GB,1=16GB", {0: 16 * GB, 1: 16 * GB}),
    (" 0 = 16GiB , 1=512MiB ", {0: 16 * 2**30, 1: 512 * 2**20}),
    ("1=1.5gb", {1: 1_500_000_000}),
    ("0=1000", {0: 1000}),
    ("2=250MB,", {2: 250 * 10**6}),
    ("", {}),
])
def test_parse_max_memory(text, expected):
    assert parse_max_memory(text) == expected


@pytest.mark.parametrize("text, token", [
    ("16GB", "16GB"), ("a=1GB", "a=1GB"), ("0=16XB", "0=16XB"), ("0=-1GB", "0=-1GB"), ("0=1GB;1=1GB", "0=1GB;1=1GB"),
    ("0=1GB,0=2GB", "0=2GB"), ("0=0GB", "0=0GB"), ("0=1.5", "0=1.5"), ("0=16 G B", "0=16 G B"),
])
def test_parse_max_memory_names_the_bad_token_and_the_syntax(text, token):
    with pytest.raises(ConfigError) as err:
        parse_max_memory(text)
    assert repr(token) in str(err.value) and '"0=16GB,1=16GB"' in str(err.value)


@settings(deadline=None)  # a shared 2-core machine: a slow example is not a failure
@given(st.dictionaries(st.integers(0, 15), st.integers(1, 2**44), max_size=8))
def test_format_then_parse_round_trips(budgets):
    assert parse_max_memory(format_max_memory(budgets)) == budgets


@settings(deadline=None)
@given(st.dictionaries(st.integers(0, 15), st.tuples(st.integers(1, 10**6), st.sampled_from(
    [("", 1), ("GB", 10**9), ("gib", 2**30), ("MB", 10**6), ("MiB", 2**20)])), min_size=1, max_size=8))
def test_parse_of_written_budgets_agrees_with_accelerate(entries):
    from accelerate.utils import convert_file_size_to_int

    text = ",".join(f"{gpu}={n}{unit}" for gpu, (n, (unit, _)) in entries.items())
    parsed = parse_max_memory(text)
    assert parsed == {gpu: n * scale for gpu, (n, (_, scale)) in entries.items()}
    # The guide's max_memory={0: "16GB"} strings mean the same bytes to accelerate.
    assert all(convert_file_size_to_int(f"{n}{unit}" if unit else n) == parsed[gpu]
               for gpu, (n, (unit, _)) in entries.items())


# -- plans from sizes alone ------------------------------------------------------------------------------------

def test_staged_fits_where_resident_does_not():
    budgets = parse_max_memory("0=16GB,1=16GB")
    plan = plan_placement(sizes=FLUX_SIZES, budgets=budgets, policy="balanced", staged=True, stage_of=FLUX_STAGES)
    assert [s.stage for s in plan.stages] == [Stage.ENCODE, Stage.DENOISE, Stage.DECODE]
    assert plan.component("transformer").split and plan.component("text_encoder_2").device == 0
    assert plan.component("text_encoder").device == 1  # balanced: the GPU with the most room left
    with pytest.raises(ConfigError) as err:
        plan_placement(sizes=FLUX_SIZES, budgets=budgets, policy="balanced", staged=False, stage_of=FLUX_STAGES)
    assert ("transformer 23.8 GB + text_encoder_2 9.52 GB + text_encoder 246 MB + vae 168 MB = 33.7 GB; "
            "GPUs 0,1 offer 2×16 GB = 32 GB; raise max_memory, add gpus_per_rank, or use offload='staged'"
            ) in str(err.value)


def test_resident_balanced_spreads_and_auto_fills_in_order():
    budgets = {0: 24 * GB, 1: 24 * GB}
    balanced = plan_placement(sizes=FLUX_SIZES, budgets=budgets, policy="balanced", staged=False, stage_of=FLUX_STAGES)
    assert {c: balanced.component(c).device for c in FLUX_SIZES} == {
        "transformer": 0, "text_encoder_2": 1, "text_encoder": 1, "vae": 1}
    assert all(s.used == {0: 23_802_816_640, 1: 9_938_432_566} for s in balanced.stages)  # resident: all at once
    auto = plan_placement(sizes=FLUX_SIZES, budgets={0: 40 * GB, 1: 40 * GB}, policy="auto", staged=False,
                          stage_of=FLUX_STAGES)
    assert {auto.component(c).device for c in FLUX_SIZES} == {0}


def test_impossible_stage_raises_with_the_arithmetic():
    with pytest.raises(ConfigError) as err:
        plan_placement(sizes=FLUX_SIZES, budgets=parse_max_memory("0=10GB,1=10GB"), policy="auto", staged=True,
                       stage_of=FLUX_STAGES)
    assert str(err.value) == ("denoise stage: transformer needs 23.8 GB; GPUs 0,1 offer 2×10 GB = 20 GB; "
                              "raise max_memory, add gpus_per_rank")


def test_split_on_size_alone_loads_with_auto_and_the_room_left():
    plan = plan_placement(sizes={"transformer": 30, "vae": 4}, budgets={0: 20, 1: 20}, policy="auto", staged=False,
                          stage_of={"transformer": "denoise", "vae": "decode"})
    assert plan.component("vae").device == 0
    assert to_diffusers_kwargs(plan, stage="denoise", component="transformer") == {
        "device_map": "auto", "max_memory": {0: 16, 1: 20}}
    assert to_diffusers_kwargs(plan, stage="decode", component="vae", device_ids=(6, 7)) == {"device_map": {"": 6}}
    with pytest.raises(ValueError, match="must both be split"):  # two estimated splits could overlap on a GPU
        plan_placement(sizes={"a": 30, "b": 30}, budgets={0: 29, 1: 29, 2: 29}, policy="auto", staged=False,
                       stage_of={"a": "encode", "b": "denoise"})


def test_diffusers_balanced_drops_a_component_where_we_place_or_raise():
    """FACTS.md: diffusers' pipeline "balanced" overwrites its CPU entry. Same input, our planner keeps all."""
    from diffusers.pipelines.pipeline_loading_utils import _assign_components_to_devices

    sizes = {"transformer": 20, "text_encoder_2": 18, "vae": 1}
    theirs = _assign_components_to_devices(sizes, {0: 16, 1: 16})
    assert "transformer" not in sum(theirs.values(), [])  # dropped without a word
    stage_of = {"transformer": "denoise", "text_encoder_2": "encode", "vae": "decode"}
    with pytest.raises(ConfigError, match="= 39 bytes; GPUs 0,1 offer 2×16 bytes = 32 bytes"):
        plan_placement(sizes=sizes, budgets={0: 16, 1: 16}, policy="balanced", staged=False, stage_of=stage_of)
    ours = plan_placement(sizes=sizes, budgets={0: 24, 1: 24}, policy="balanced", staged=False, stage_of=stage_of)
    assert sorted(ours.components()) == sorted(sizes)


@settings(max_examples=300, deadline=None)
@given(sizes=st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 100), min_size=1),
       budgets=st.dictionaries(st.integers(0, 3), st.integers(1, 80), min_size=1),
       stages=st.lists(st.sampled_from([s.value for s in Stage]), min_size=6, max_size=6),
       policy=st.sampled_from(["balanced", "auto"]), staged=st.booleans())
def test_never_drops_a_component_and_never_exceeds_a_budget(sizes, budgets, stages, policy, staged):
    stage_of = dict(zip("abcdef", stages))
    try:
        plan = plan_placement(sizes=sizes, budgets=budgets, policy=policy, staged=staged, stage_of=stage_of)
    except ConfigError as err:
        event("does not fit")
        assert " needs " in str(err) or " = " in str(err)
        return
    except ValueError:  # two splits in one pool need meta models
        assume(False)
    event("placed, with a split" if any(plan.component(c).split for c in sizes) else "placed whole")
    assert sorted(plan.components()) == sorted(sizes)
    for stage in plan.stages:
        assert all(p.stage.value == stage_of[p.component] for p in stage.components)
        assert all(stage.used.get(g, 0) <= b for g, b in budgets.items())
        for p in stage.components:
            assert sum(p.used.values()) == p.size and (p.split or p.used == {p.device: p.size} or p.size == 0)
        if staged:
            assert stage.used == {g: sum(p.used.get(g, 0) for p in stage.components) for g in budgets}


def test_every_weighted_component_needs_a_stage_and_the_policy_must_plan():
    with pytest.raises(ConfigError, match=r"\['vae'\] have weights but no stage"):
        plan_placement(sizes={"vae": 1}, budgets={0: 2}, policy="auto", staged=True, stage_of={"tokenizer": "encode"})
    with pytest.raises(ConfigError, match="'none' puts each component whole"):
        plan_placement(sizes={"vae": 1}, budgets={0: 2}, policy="none", staged=True, stage_of={"vae": "decode"})


def test_cpu_plan_collapses_to_cpu_and_loads_for_real(tiny_flux_dir):
    from diffusers import FluxTransformer2DModel

    plan = plan_placement(sizes=component_sizes(tiny_flux_dir, dtype="float32"), budgets={}, policy="balanced",
                          staged=True, stage_of=FLUX_STAGES)
    assert plan.on_cpu and {plan.component(c).device for c in FLUX_SIZES} == {"cpu"}
    kwargs = to_diffusers_kwargs(plan, stage="denoise", component="transformer")
    assert kwargs == {}
    model = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer", **kwargs)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


# -- meta models and accelerate's split ------------------------------------------------------------------------

def test_flux_dev_transformer_splits_over_two_16gb_gpus_within_budget(flux_dev_meta):
    size = module_bytes(flux_dev_meta)
    assert size == FLUX_SIZES["transformer"]  # 11.9B parameters × 2 bytes
    budgets = parse_max_memory("0=16GB,1=16GB")
    plan = plan_placement(sizes=FLUX_SIZES, budgets=budgets, policy="balanced", staged=True, stage_of=FLUX_STAGES,
                          meta_models={"transformer": flux_dev_meta})
    placed = plan.component("transformer")
    device_map = to_diffusers_kwargs(plan, stage="denoise", component="transformer")["device_map"]
    assert device_map == placed.device_map and set(device_map.values()) == {0, 1}
    used = bytes_per_gpu(flux_dev_meta, device_map)
    assert used == placed.used and sum(used.values()) == size
    assert all(used[g] <= budgets[g] for g in used), used
    assert max(used.values()) - min(used.values()) < 2 * GB  # "balanced" spreads the layers


def test_flux_dev_transformer_does_not_fit_and_says_why(flux_dev_meta):
    args = dict(sizes={"transformer": FLUX_SIZES["transformer"]}, policy="balanced", staged=True,
                stage_of=FLUX_STAGES, meta_models={"transformer": flux_dev_meta})
    with pytest.raises(ConfigError, match="transformer needs 23.8 GB; GPUs 0,1 offer 2×10 GB = 20 GB; raise"):
        plan_placement(budgets={0: 10 * GB, 1: 10 * GB}, **args)
    # 24 GB in total is enough bytes, but not by whole blocks with accelerate's room kept on GPU 0.
    with pytest.raises(ConfigError, match=r"2×12 GB = 24 GB left, but it splits only between whole "
                                          r"FluxSingleTransformerBlock/FluxTransformerBlock blocks \(largest 680 MB\)"):
        plan_placement(budgets={0: 12 * GB, 1: 12 * GB}, **args)
    assert set(split_module(flux_dev_meta, budgets={0: 13 * GB, 1: 13 * GB}).values()) == {0, 1}
    with pytest.raises(ConfigError, match="FluxTransformer2DModel needs 23.8 GB"):
        split_module(flux_dev_meta, budgets={0: 12 * GB, 1: 12 * GB})


def test_wan_keeps_its_fp32_modules_and_auto_fills_gpus_in_order():
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():  # Wan2.1 1.3B dimensions
        wan = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                                    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)
    params = sum(p.numel() for p in wan.parameters())
    fp32 = sum(p.numel() for n, p in wan.named_parameters() if {"time_embedder", "scale_shift_table", "norm1",
                                                                "norm2", "norm3"} & set(n.split(".")))
    cast_like_loader(wan, dtype=torch.bfloat16)
    buffers = sum(b.numel() * b.element_size() for b in wan.buffers())
    assert module_bytes(wan) == 2 * params + 2 * fp32 + buffers  # norms etc. stay 4 bytes in bf16
    budgets = {0: 2 * GB, 1: 2 * GB}
    plan = plan_placement(sizes={"transformer": module_bytes(wan)}, budgets=budgets, policy="auto", staged=True,
                          stage_of={"transformer": "denoise"}, meta_models={"transformer": wan})
    used = bytes_per_gpu(wan, plan.component("transformer").device_map)
    assert used[0] > 1.5 * GB and used[0] <= budgets[0] and used[1] > 0  # GPU 0 first, the rest on GPU 1


def test_component_sizes_equal_what_from_pretrained_loads(tiny_flux_dir):
    import diffusers
    import transformers

    classes = {"text_encoder": transformers.CLIPTextModel, "text_encoder_2": transformers.T5EncoderModel,
               "transformer": diffusers.FluxTransformer2DModel, "vae": diffusers.AutoencoderKL}
    for dtype in (torch.bfloat16, torch.float16):  # T5 keeps its "wo" in float32 for float16 only
        sizes = component_sizes(tiny_flux_dir, dtype=dtype)
        assert set(sizes) == set(classes)  # tokenizers and scheduler hold no weights
        for name, cls in classes.items():
            loaded = cls.from_pretrained(tiny_flux_dir, subfolder=name, dtype=dtype)  # torch_dtype is deprecated
            assert sizes[name] == loaded_bytes(loaded), (name, dtype)


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_component_sizes_of_every_family_equal_the_loaded_pipeline(tmp_path, family):
    """Qwen2.5-VL's float32 rotary buffers, Wan's float32 norms and UMT5's float32 "wo" in float16 included."""
    from diffusers import DiffusionPipeline

    from dist_backend.pipelines.tiny import make_tiny

    model_dir = make_tiny(family, tmp_path / family)
    for dtype in (torch.bfloat16, torch.float16):
        sizes = component_sizes(model_dir, dtype=dtype)
        pipe = DiffusionPipeline.from_pretrained(model_dir, dtype=dtype)  # diffusers 0.42 deprecates torch_dtype
        assert sizes == {name: loaded_bytes(getattr(pipe, name)) for name in sizes}, (family, dtype)
        assert set(sizes) == {n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


@pytest.mark.parametrize("component, cls_path", [
    ("transformer", "diffusers.FluxTransformer2DModel"), ("text_encoder_2", "transformers.T5EncoderModel")])
def test_split_maps_are_accepted_by_from_pretrained(tiny_flux_dir, component, cls_path):
    """Maps go to GPUs on real machines; here each GPU index becomes "cpu", which proves the module paths are the
    ones diffusers' / transformers' loaders resolve (an unknown or missing path fails the load)."""
    import importlib

    library, name = cls_path.split(".")
    cls = getattr(importlib.import_module(library), name)
    meta = build_meta_model(tiny_flux_dir, component, dtype=torch.float32)
    size = module_bytes(meta)
    # The tiny T5 is mostly its (tied) embedding, which must stay whole: give each GPU 90 % of the model.
    plan = plan_placement(sizes={component: size}, budgets={0: size * 9 // 10, 1: size * 9 // 10}, policy="balanced",
                          staged=True, stage_of={component: "denoise"}, meta_models={component: meta})
    device_map = to_diffusers_kwargs(plan, stage="denoise", component=component)["device_map"]
    assert set(device_map.values()) == {0, 1}
    on_cpu = cls.from_pretrained(tiny_flux_dir, subfolder=component, device_map={k: "cpu" for k in device_map})
    reference = cls.from_pretrained(tiny_flux_dir, subfolder=component)
    expected = reference.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in on_cpu.state_dict().items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plans_load_on_a_real_gpu(tiny_flux_dir):
    """On the device machine: whole ({"": 0}) and per-module (int values) maps load onto cuda:0, and the memory
    allocated equals the planned bytes."""
    from diffusers import FluxTransformer2DModel

    meta = build_meta_model(tiny_flux_dir, "transformer", dtype=torch.bfloat16)
    size = module_bytes(meta)
    for budgets in ({0: 2 * size}, {0: size * 3 // 4, 1: size * 3 // 4}):
        plan = plan_placement(sizes={"transformer": size}, budgets=budgets, policy="balanced", staged=True,
                              stage_of={"transformer": "denoise"}, meta_models={"transformer": meta})
        kwargs = to_diffusers_kwargs(plan, stage="denoise", component="transformer")
        if isinstance(kwargs["device_map"], dict) and len(budgets) > 1:  # one GPU here: fold GPU 1 onto GPU 0
            kwargs["device_map"] = {k: 0 for k in kwargs["device_map"]}
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(0)
        model = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer", dtype=torch.bfloat16,
                                                       **kwargs)
        assert {p.device for p in model.parameters()} == {torch.device("cuda", 0)}
        assert loaded_bytes(model) == size and torch.cuda.memory_allocated(0) - before >= size
        del model

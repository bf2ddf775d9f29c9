"""strategy = auto: the planner on the real configurations of FLUX.1-dev, Qwen-Image, Wan 2.1 14B and Wan 2.2 A14B.

tests/data/models holds their published model_index.json and component config.json files and no weights; sizes
come from meta-device models. Every plan on 2/4/8 GPUs of 24/48/80 GB over NVLink and PCIe is checked for what a
user relies on: its degrees multiply to the GPUs and divide the heads, its memory estimate is within the GPU,
and its reasons name each constraint that decided. The cost model is checked against the H100 measurements it
was calibrated on (docs/PERFORMANCE.md §7), and docs/PLANS.md against what the planner says today.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError, ModelError
from dist_backend.planning import costs
from dist_backend.planning.hardware import Gpus, Interconnect, parse_memory
from dist_backend.planning.model_facts import read_model_facts
from dist_backend.planning.planner import Hand, Request, WeightStorage, plan, session_kwargs
from dist_backend.planning.table import COUNTS, LINKS, MEMORIES, MODELS, render

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "tests" / "data" / "models"
GB = 10**9
REQUESTS = {folder: request for folder, _, request in MODELS}


@pytest.fixture(scope="module")
def facts():
    return {folder: read_model_facts(MODELS_DIR / folder) for folder in REQUESTS}


def test_sizes_from_configs_alone_equal_the_published_models(facts):
    # FLUX.1-dev's bf16 component sizes as test_placement.py lists them (to 0.02 %: they count a few buffers
    # differently); parameter counts of the others as published (Qwen-Image 20.4 B + Qwen2.5-VL-7B 8.29 B,
    # Wan 14 B, UMT5-XXL encoder 5.68 B).
    known = {"text_encoder": 246_144_352, "text_encoder_2": 9_524_621_312, "transformer": 23_802_816_640,
             "vae": 167_666_902}
    assert facts["flux1-dev"].weights == pytest.approx(known, rel=2e-4)
    assert facts["flux1-dev"].weights["transformer"] == known["transformer"]
    assert facts["qwen-image"].weights["transformer"] / 2 == pytest.approx(20.43e9, rel=0.01)
    assert facts["qwen-image"].weights["text_encoder"] / 2 == pytest.approx(8.29e9, rel=0.01)
    assert facts["wan2.1-t2v-14b"].weights["transformer"] / 2 == pytest.approx(14.3e9, rel=0.01)
    assert facts["wan2.1-t2v-14b"].weights["text_encoder"] / 2 == pytest.approx(5.68e9, rel=0.01)
    wan22 = facts["wan2.2-t2v-a14b"]
    assert wan22.stage_of["transformer_2"] == "denoise"
    assert wan22.weights["transformer_2"] == wan22.weights["transformer"]
    for f in facts.values():  # fp8 storage halves the cast layers only
        for c, b in f.fp8_weights.items():
            assert f.weights[c] / 2 < b < f.weights[c]


def test_a_folder_of_configs_plans_though_the_engine_would_refuse_to_load_it():
    from dist_backend.pipelines import read_model_config

    with pytest.raises(ModelError, match="missing|no weights"):
        read_model_config(MODELS_DIR / "flux1-dev")
    assert not list(MODELS_DIR.rglob("*.safetensors"))


def test_flops_equal_the_counts_of_the_gpu_benchmark(facts):
    # bench/gpu_model.py counted FLUX.1-dev at 1024² with hooks: 59.5 TFLOP linear + 14.9 TFLOP attention.
    f = facts["flux1-dev"]
    linear, attention = f.shape.flops(image_tokens=f.tokens(height=1024, width=1024), text_tokens=512)
    assert linear / 1e12 == pytest.approx(59.5, abs=0.05)
    assert attention / 1e12 == pytest.approx(14.9, abs=0.05)


@pytest.mark.parametrize("degree, measured_eager", [(2, 1.53), (4, 2.13), (8, 2.30)])
def test_cost_model_reproduces_the_measured_h100_ulysses_speedups(facts, degree, measured_eager):
    # docs/PERFORMANCE.md §7: eager diffusers, FLUX.1-dev 1024², Ulysses over NVLink on H100s.
    p = plan(model=facts["flux1-dev"], gpus=Gpus(count=degree, memory=80 * GB, interconnect="nvlink", flops=989e12),
             request=Request(), hand=Hand(ulysses=degree))
    assert p.speedup == pytest.approx(measured_eager, rel=0.10)


@pytest.mark.parametrize("folder", list(REQUESTS))
def test_every_plan_multiplies_to_the_gpus_divides_the_heads_fits_and_says_why(facts, folder):
    f = facts[folder]
    request = Request(**REQUESTS[folder])
    heads = f.shape.heads
    planned = refused = 0
    for count in COUNTS:
        for memory in MEMORIES:
            for link in LINKS:
                gpus = Gpus(count=count, memory=memory * GB, interconnect=link)
                try:
                    p = plan(model=f, gpus=gpus, request=request)
                except ConfigError as exc:  # refused with the arithmetic
                    refused += 1
                    assert "does not fit" in str(exc) and " GB" in str(exc) and "=" in str(exc), str(exc)
                    continue
                planned += 1
                text = "\n".join(p.reasons)
                assert p.dp * p.cfg * p.ring * p.ulysses * p.gpus_per_rank == count
                assert heads % p.ulysses == 0
                assert p.memory_used <= p.memory_budget
                assert f"{count} × {memory} GB over {'NVLink' if link == 'nvlink' else 'PCIe'}" in text
                assert f"Fits: {p.memory_used / GB:.3g} GB of {memory} GB per GPU" in text
                if p.ulysses > 1:
                    assert f"{heads} heads divide by {p.ulysses}" in text
                if p.ring > 1:
                    assert f"Ring {p.ring}" in text
                if p.cfg > 1:
                    assert "true CFG" in text
                assert (p.cfg == 2) <= f.true_cfg(guidance=request.guidance, negative_prompt=request.negative_prompt)
                if p.dp > 1:
                    assert f"Data parallel {p.dp}" in text
                if p.gpus_per_rank > 1:
                    assert "only fits split by layers" in text
                if p.weights is WeightStorage.FP8:
                    assert "no layout fits in bf16" in text
                else:
                    fp8_note = any("fp8 weights would allow" in w for w in p.warnings)
                    assert fp8_note <= any(r.startswith("bf16 kept: fp8 storage") for r in p.reasons)
                if p.vae_tiling:
                    assert "VAE tiling" in text
                assert bool(p.warnings) == (p.speedup < costs.SPEEDUP_WARNING)
    assert planned >= 12, (planned, refused)


def test_true_cfg_gets_its_own_ranks_and_distilled_guidance_does_not(facts):
    two_h100 = Gpus(count=2, memory=80 * GB, interconnect="nvlink")
    qwen = plan(model=facts["qwen-image"], gpus=two_h100, request=Request(guidance=4.0, negative_prompt=" "))
    assert (qwen.cfg, qwen.dp, qwen.ring, qwen.ulysses) == (2, 1, 1, 1)
    no_negative = plan(model=facts["qwen-image"], gpus=two_h100, request=Request(guidance=4.0))
    assert no_negative.cfg == 1 and any("no negative prompt" in r for r in no_negative.reasons)
    flux = plan(model=facts["flux1-dev"], gpus=two_h100, request=Request(guidance=3.5, negative_prompt="blurry"))
    assert flux.cfg == 1 and any("distilled" in r for r in flux.reasons)
    with pytest.raises(ConfigError, match="cfg 2 needs a call with true CFG"):
        plan(model=facts["flux1-dev"], gpus=two_h100, request=Request(), hand=Hand(cfg=2))


def test_flux_true_cfg_is_a_request_fact_that_gets_its_own_ranks(facts):
    two_h100 = Gpus(count=2, memory=80 * GB, interconnect="nvlink")
    flux = facts["flux1-dev"]
    p = plan(model=flux, gpus=two_h100, request=Request(true_cfg=4.0, negative_prompt="blurry"))
    assert (p.cfg, p.dp, p.ulysses) == (2, 1, 1)
    assert any(r.startswith("CFG 2: the call uses true CFG (true_cfg 4, a negative prompt)") for r in p.reasons)
    # Two passes per step on one GPU: the single-GPU step doubles, CFG parallel halves it again.
    plain = plan(model=flux, gpus=two_h100, request=Request(), hand=Hand(ulysses=2))
    assert p.single_gpu_step_seconds == pytest.approx(2 * plain.single_gpu_step_seconds, rel=1e-6)
    assert p.speedup == pytest.approx(2.0, rel=0.02)
    # FluxPipeline runs true CFG only with a negative prompt; "" is none, as in the engine.
    for request in (Request(true_cfg=4.0), Request(true_cfg=4.0, negative_prompt="")):
        off = plan(model=flux, gpus=two_h100, request=request)
        assert off.cfg == 1 and any("true_cfg 4 without a negative prompt" in r for r in off.reasons)
    with pytest.raises(ConfigError, match="cfg 2 needs a call with true CFG"):
        plan(model=flux, gpus=two_h100, request=Request(true_cfg=4.0), hand=Hand(cfg=2))
    with pytest.raises(ConfigError, match="Flux's true CFG scale; qwen-image .* leave true_cfg at 1"):
        plan(model=facts["qwen-image"], gpus=two_h100, request=Request(true_cfg=4.0, negative_prompt=" "))


def test_clusters_keep_context_parallel_inside_a_machine_and_say_so(facts):
    flux, qwen = facts["flux1-dev"], facts["qwen-image"]
    h100 = dict(memory=80 * GB, interconnect="nvlink")
    # One machine of 4: Ulysses 4. Two machines of 2: Ulysses 4 would cross the network every layer, so the CP
    # group stays inside a machine and dp spans the two (the second group idles: 1 image).
    assert plan(model=flux, gpus=Gpus(count=4, **h100), request=Request()).strategy == "ulysses4"
    two = plan(model=flux, gpus=Gpus.on_machines(nodes=2, count=4, **h100), request=Request())
    assert two.strategy == "dp2×ulysses2" and not two.warnings
    assert any(r.startswith("Machines: 2 (2 + 2 GPUs); context parallel stays inside each machine (2 ranks per "
                            "group), and data parallel spans the machines") for r in two.reasons)
    assert "a 12.5 GB/s network between them" in two.reasons[0]
    # The same Ulysses 4 by hand: its exchange is costed over the network (costs.INTER_NODE_BANDWIDTH) and warned.
    spanning = plan(model=flux, gpus=Gpus.on_machines(nodes=2, count=4, **h100), request=Request(),
                    hand=Hand(ulysses=4))
    inside = plan(model=flux, gpus=Gpus(count=4, **h100), request=Request(), hand=Hand(ulysses=4))
    assert spanning.step_seconds > inside.step_seconds + 0.01
    assert any("context-parallel groups of 4 ranks span machines" in w for w in spanning.warnings)
    # Qwen-Image with true CFG on 4 machines of 2: CP 2 inside each, CFG and dp across (one machine: cfg2×ulysses4).
    cfg_request = Request(guidance=4.0, negative_prompt=" ", height=1328, width=1328)
    assert plan(model=qwen, gpus=Gpus(count=8, **h100), request=cfg_request).strategy == "cfg2×ulysses4"
    four = plan(model=qwen, gpus=Gpus.on_machines(nodes=4, count=8, **h100), request=cfg_request)
    assert four.strategy == "dp2×cfg2×ulysses2"
    assert any("context parallel stays inside each machine (2 ranks per group), and data parallel and CFG span "
               "the machines" in r for r in four.reasons)
    # device_map cannot put one rank's GPUs on two machines.
    with pytest.raises(ConfigError, match="device_map needs each rank's 2 GPUs on one machine"):
        plan(model=flux, gpus=Gpus(count=2, per_node=(1, 1), **h100), request=Request(), hand=Hand(gpus_per_rank=2))
    with pytest.raises(ConfigError, match=r"3 \+ 2 = 5, but gpus is 4"):
        Gpus(count=4, per_node=(3, 2), **h100)
    with pytest.raises(ConfigError, match="do not spread evenly over 3 machines"):
        Gpus.on_machines(nodes=3, count=4, **h100)


def test_cli_plan_takes_true_cfg_nodes_and_a_cluster_spec(capsys):
    from dist_backend.cli import main

    flux = str(MODELS_DIR / "flux1-dev")
    gpus = ["--gpus", "4", "--gpu-memory", "80GB", "--interconnect", "nvlink", "--json"]
    assert main(["plan", "--model", flux, *gpus, "--true-cfg", "3", "--negative-prompt", "blurry"]) == 0
    assert json.loads(capsys.readouterr().out)["cfg"] == 2
    assert main(["plan", "--model", flux, *gpus, "--nodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "dp2×ulysses2"
    assert main(["plan", "--model", flux, *gpus[2:], "--cluster", "local:2, 10.0.0.7:2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "dp2×ulysses2" and out["gpus"] == 4
    assert main(["plan", "--model", flux, *gpus, "--nodes", "3", "--cluster", "local:2, 10.0.0.7:2"]) == 2
    assert "--nodes 3 but --cluster names 2 machines" in capsys.readouterr().err


def test_pcie_and_tiny_sizes_warn_with_the_cause(facts):
    flux = facts["flux1-dev"]
    pcie = plan(model=flux, gpus=Gpus(count=2, memory=80 * GB, interconnect="pcie"), request=Request())
    assert pcie.speedup < 1.1 and "interconnect: PCIe" in pcie.warnings[0]
    small = plan(model=flux, gpus=Gpus(count=8, memory=80 * GB, interconnect="nvlink"),
                 request=Request(height=256, width=256))
    assert "too few tokens" in small.warnings[0]
    nvlink = plan(model=flux, gpus=Gpus(count=2, memory=80 * GB, interconnect="nvlink"), request=Request())
    assert nvlink.ulysses == 2 and not nvlink.warnings


def test_uneven_lengths_are_named(facts):
    # 1008² gives 63 × 63 = 3969 image tokens: odd, so Ulysses 2 pads them (diffusers' ulysses_anything).
    p = plan(model=facts["flux1-dev"], gpus=Gpus(count=2, memory=80 * GB, interconnect="nvlink"),
             request=Request(height=1008, width=1008), hand=Hand(ulysses=2))
    assert any("image tokens do not divide by 2 (uneven mode pads them)" in r for r in p.reasons)
    with pytest.raises(ConfigError, match="ring 2 × ulysses 2: 3969 image tokens do not divide by 4"):
        plan(model=facts["flux1-dev"], gpus=Gpus(count=4, memory=80 * GB, interconnect="nvlink"),
             request=Request(height=1008, width=1008), hand=Hand(ring=2, ulysses=2))


def test_hand_set_degrees_win_and_are_explained_or_refused(facts):
    four_h100 = Gpus(count=4, memory=80 * GB, interconnect="nvlink")
    p = plan(model=facts["flux1-dev"], gpus=four_h100, request=Request(), hand=Hand(ring=2, ulysses=2))
    assert (p.ring, p.ulysses, p.dp) == (2, 2, 1) and p.hand_set == ("ring", "ulysses")
    assert any("(set by hand)" in r for r in p.reasons)
    with pytest.raises(ConfigError, match="multiplies to 4 GPUs"):
        plan(model=facts["flux1-dev"], gpus=four_h100, request=Request(), hand=Hand(dp=3))
    with pytest.raises(ConfigError, match=r"transformer needs 23.8 GB; GPU 0 offers"):
        plan(model=facts["flux1-dev"], gpus=Gpus(count=2, memory=24 * GB), request=Request(),
             hand=Hand(ulysses=2, weights="bf16"))
    with pytest.raises(ConfigError, match="multiple of 16"):
        plan(model=facts["flux1-dev"], gpus=four_h100, request=Request(height=1000))


def test_a_model_that_fits_nowhere_is_refused_with_the_arithmetic(facts):
    with pytest.raises(ConfigError) as err:
        plan(model=facts["wan2.2-t2v-a14b"], gpus=Gpus(count=2, memory=24 * GB),
             request=Request(**REQUESTS["wan2.2-t2v-a14b"]))
    assert "transformer 14.6 GB + transformer_2 14.6 GB = 29.2 GB" in str(err.value)


def test_session_kwargs_build_the_session_config_or_name_what_is_missing(facts):
    p = plan(model=facts["flux1-dev"], gpus=Gpus(count=4, memory=80 * GB, interconnect="nvlink"), request=Request())
    config = SessionConfig(**session_kwargs(p))
    assert (config.world_size, config.dp, config.ulysses, config.device.value) == (4, 1, 4, "cuda")
    sharded = plan(model=facts["flux1-dev"], gpus=Gpus(count=2, memory=24 * GB), request=Request())
    config = SessionConfig(**session_kwargs(sharded))
    assert (config.world_size, config.gpus_per_rank, config.device_map.value) == (1, 2, "balanced")
    cfg2 = plan(model=facts["qwen-image"], gpus=Gpus(count=2, memory=80 * GB),
                request=Request(guidance=4.0, negative_prompt=" "))
    assert session_kwargs(cfg2, config_fields={"world_size", "dp", "ring", "ulysses", "gpus_per_rank", "offload",
                                               "device", "dtype", "cfg"})["cfg"] == 2
    if "cfg" not in {f for f in SessionConfig.__dataclass_fields__}:
        with pytest.raises(ConfigError, match="cfg=2"):
            session_kwargs(cfg2)


def test_gpu_memory_text():
    assert parse_memory("24GB") == 24 * GB and parse_memory("48GiB") == 48 * 2**30 and parse_memory("80") == 80 * GB
    with pytest.raises(ConfigError, match="24GB"):
        parse_memory("lots")
    assert Gpus(count=2, memory=GB, interconnect="nvlink").interconnect is Interconnect.NVLINK
    with pytest.raises(ConfigError, match="nvlink, pcie"):
        Gpus(count=2, memory=GB, interconnect="infiniband")


def test_cli_plan_prints_the_plan_or_the_refusal(capsys):
    from dist_backend.cli import main

    model = str(MODELS_DIR / "wan2.1-t2v-14b")
    assert main(["plan", "--model", model, "--gpus", "4", "--gpu-memory", "80GB", "--interconnect", "nvlink",
                 "--height", "480", "--width", "832", "--frames", "81", "--guidance", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cfg"] * out["dp"] * out["ring"] * out["ulysses"] * out["gpus_per_rank"] == 4 and out["reasons"]
    assert main(["plan", "--model", model, "--gpus", "2", "--gpu-memory", "8GB"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_docs_plans_table_is_up_to_date(facts):
    assert (ROOT / "docs" / "PLANS.md").read_text(encoding="utf-8") == render(MODELS_DIR, facts=facts), (
        "docs/PLANS.md is stale: python -m dist_backend.planning.table --models tests/data/models --out docs/PLANS.md")


def test_vae_tiling_when_a_whole_decode_does_not_fit(facts):
    """Wan 2.1 14B, 81 frames: at 1920×1088 a whole decode needs 4 frames in flight × 1920 × 1088 × 192 channels ×
    2 bytes × 10 widths = 32.1 GB of activations, more than a 24 GB GPU: the plan tiles, says why, and the decode
    runs in the tiles its estimate assumed. At 1280×720 (14.2 GB) the whole decode fits next to the VAE."""
    from dist_backend.planning.layout import decode_tiling
    from dist_backend.tiled_decode import VaeTiling

    wan = facts["wan2.1-t2v-14b"]
    gpus = Gpus(count=8, memory=24 * GB, interconnect="nvlink")
    big = plan(model=wan, gpus=gpus, request=Request(height=1088, width=1920, frames=81, guidance=5.0))
    assert big.vae_tiling
    assert "VAE tiling: decoding a whole 1920×1088 output would need 32.1 GB of activations; tiles of 512² need " \
           "4.03 GB." in big.reasons
    assert "VAE tiling" in big.describe().splitlines()[0]
    tiling = decode_tiling(big)
    assert (tiling.mode, tiling.tile_size, tiling.overlap) == (VaeTiling.ON, costs.VAE_TILE, costs.VAE_TILE // 4)
    small = plan(model=wan, gpus=Gpus(count=2, memory=24 * GB), request=Request(height=720, width=1280, frames=81,
                                                                                guidance=5.0))
    assert not small.vae_tiling and not any("VAE tiling" in r for r in small.reasons)
    assert decode_tiling(small).mode is VaeTiling.OFF
    assert costs.vae_decode_bytes(channels=wan.vae_channels, height=720, width=1280, frames=81,
                                  temporal=wan.vae_temporal, tile=None) == 4 * 1280 * 720 * 192 * 2 * 10

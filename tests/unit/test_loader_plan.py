"""strategy on the loader nodes, decided without ComfyUI and without ranks: the node's settings -> SessionConfig +
LoaderPlan (nodes/parallel_inputs.planned_config), and ParallelDenoise's check of each request against the loaded
layout (planning/auto.check_request), on the tiny pipelines' real configs with CPU ranks.

The nodes import the engine relatively (`..dist_backend`), as ComfyUI imports the pack: the pack is imported here
as a package of its own, so its error classes are its own module's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK = "distdiff_pack_under_test"
BASE = dict(ranks=2, dp=0, ring=1, ulysses=1, device="cpu", dtype="float32", offload="resident")


@pytest.fixture(scope="module")
def pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    from importlib import import_module

    return {name: import_module(f"{PACK}.{name}") for name in ("nodes.parallel_inputs", "dist_backend.planning.auto",
                                                               "dist_backend.planning.model_facts",
                                                               "dist_backend.errors")}


def planned(pack, folder, **settings):
    facts = pack["dist_backend.planning.model_facts"].read_model_facts
    return pack["nodes.parallel_inputs"].planned_config({**BASE, **settings}, facts=lambda: facts(folder))


def test_auto_chooses_the_degrees_left_at_their_default_and_keeps_the_ones_set(pack, tiny_dirs):
    config, loaded = planned(pack, tiny_dirs["flux"], strategy="auto")
    # One image (the usual call), 4 heads: Ulysses 2 (a dp group would idle); the plan text names it.
    assert (config.world_size, config.dp, config.cfg, config.ring, config.ulysses) == (2, 1, 1, 1, 2)
    assert loaded.plan.strategy == "ulysses2" and loaded.plan.hand_set == ("gpus_per_rank", "weights")
    assert loaded.text.startswith("strategy auto: planned at load for ")
    assert "1 image at 1024×1024, guidance 3.5, no negative prompt" in loaded.text.splitlines()[0]
    assert loaded.text.splitlines()[1].startswith("plan: ulysses2 on 2 GPUs (2 ranks)")
    # A degree changed from its default is the user's: kept, and explained as set by hand.
    config, loaded = planned(pack, tiny_dirs["flux"], strategy="auto", dp=2)
    assert (config.dp, config.ulysses) == (2, 1) and "dp" in loaded.plan.hand_set
    assert any(r.startswith("Data parallel 2 (set by hand)") for r in loaded.plan.reasons)
    # A cluster's ranks per machine reach the planner (h-cluster's input passes them as per_node).
    facts = pack["dist_backend.planning.model_facts"].read_model_facts
    _, loaded = pack["nodes.parallel_inputs"].planned_config(dict(BASE, strategy="auto", ranks=4),
                                                             facts=lambda: facts(tiny_dirs["flux"]), per_node=(2, 2))
    assert loaded.plan.world_size == 4 and any(r.startswith("Machines: 2 (2 + 2 GPUs)") for r in loaded.plan.reasons)
    # Wan's usual call uses CFG: the planner gives its two branches their own ranks.
    config, loaded = planned(pack, tiny_dirs["wan"], strategy="auto")
    assert (config.cfg, config.world_size) == (2, 2) and "832×480×81 frames" in loaded.text.splitlines()[0]


def test_manual_runs_the_layout_as_set_and_the_plan_only_explains_it(pack, tiny_dirs):
    inputs = pack["nodes.parallel_inputs"]
    settings = dict(BASE, ulysses=2, strategy="manual")
    config, loaded = planned(pack, tiny_dirs["flux"], **settings)
    assert config == inputs.session_config(settings)
    assert loaded.plan.strategy == "ulysses2" and "Ulysses 2 (set by hand)" in loaded.text
    # A model the planner cannot read never stops a manual load: the text says why there is no plan.
    config, loaded = inputs.planned_config(settings, facts=lambda: pack["dist_backend.planning.model_facts"]
                                           .read_model_facts(tiny_dirs["flux"] / "missing"))
    assert config == inputs.session_config(settings) and loaded.plan is None
    assert "the planner could not read this model (ModelError:" in loaded.text
    assert loaded.summary()["layout"] is None and loaded.summary()["warnings"]


def test_parallel_denoise_refuses_a_request_the_auto_layout_cannot_run_and_names_a_faster_one(pack, tiny_dirs):
    auto = pack["dist_backend.planning.auto"]
    errors = pack["dist_backend.errors"]
    _, qwen = planned(pack, tiny_dirs["qwenimage"], strategy="auto")
    assert qwen.plan.cfg == 2  # Qwen-Image's usual call: true CFG with a negative prompt
    with_negative = auto.call_request(qwen.facts, height=64, width=64, num_frames=1, images=1, guidance=4.0,
                                      negative_prompt=" ", true_cfg=1.0, steps=4)
    assert auto.check_request(qwen, with_negative).notes == ()
    without = auto.call_request(qwen.facts, height=64, width=64, num_frames=1, images=1, guidance=4.0,
                                negative_prompt=None, true_cfg=1.0, steps=4)
    with pytest.raises(errors.ConfigError, match=r"strategy auto chose cfg2 at load .* this request \(1 image at "
                                                 r"64×64, guidance 4, no negative prompt\) does not run on it: .*cfg 2 "
                                                 r"needs a call with true CFG"):
        auto.check_request(qwen, without)
    # Four images on the Ulysses 2 chosen for one: dp 2 is predicted twice as fast; said, not refused.
    _, flux = planned(pack, tiny_dirs["flux"], strategy="auto")
    four = auto.call_request(flux.facts, height=64, width=64, num_frames=1, images=4, guidance=3.5,
                             negative_prompt=None, true_cfg=1.0, steps=4)
    notes = auto.check_request(flux, four).notes  # the checked layout's own warnings, then the faster layout
    assert "the planner predicts dp2 2.00× faster than the loaded ulysses2" in notes[-1]
    assert not any("faster than the loaded" in n for n in auto.check_request(flux, with_flux_image(auto, flux)).notes)
    assert auto.check_request(flux, four).summary()["last_request"] == list(notes)
    # A size the family refuses is left to the engine's own check (its message), not refused as a plan mismatch.
    odd = auto.call_request(flux.facts, height=1000, width=64, num_frames=1, images=1, guidance=3.5,
                            negative_prompt=None, true_cfg=1.0, steps=4)
    assert auto.check_request(flux, odd).notes == ()


def with_flux_image(auto, loaded):
    return auto.call_request(loaded.facts, height=64, width=64, num_frames=1, images=1, guidance=3.5,
                             negative_prompt=None, true_cfg=1.0, steps=4)


def test_a_start_latent_sets_the_size_the_request_is_checked_at(pack, tiny_dirs):
    auto = pack["dist_backend.planning.auto"]
    facts = pack["dist_backend.planning.model_facts"].read_model_facts(tiny_dirs["wan"])
    request = auto.call_request(facts, height=1024, width=1024, num_frames=1, images=1, guidance=5.0,
                                negative_prompt=None, true_cfg=1.0, steps=4, latent_shape=(1, 16, 3, 6, 10))
    assert (request.height, request.width) == (6 * facts.vae_scale, 10 * facts.vae_scale)
    assert request.frames == 2 * facts.vae_temporal + 1


def test_generate_auto_plans_flux_true_cfg_and_the_machines_of_a_cluster(tiny_dirs):
    from dist_backend.cli import build_parser
    from dist_backend.planning.command import auto_session_config

    base = ["generate", "--auto", "--model", str(tiny_dirs["flux"]), "--prompt", "a cat", "--out", "unused",
            "--height", "64", "--width", "64", "--world-size", "2"]
    config, chosen = auto_session_config(build_parser().parse_args(
        [*base, "--true-cfg", "3", "--negative-prompt", "blurry"]))
    assert (config.cfg, config.world_size, chosen.strategy) == (2, 2, "cfg2")
    config, chosen = auto_session_config(build_parser().parse_args(base))
    assert config.cfg == 1 and any("true_cfg 1" in r for r in chosen.reasons)
    # One rank on each of two machines: the cluster's machines reach the planner (and its reasons).
    _, chosen = auto_session_config(build_parser().parse_args(
        [*base, "--cluster", "local:1, 10.0.0.7:1", "--listen", "10.0.0.1:29600", "--token-file", "t"]))
    assert any(r.startswith("Machines: 2 (1 + 1 GPUs)") for r in chosen.reasons)

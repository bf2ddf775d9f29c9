"""The committed example workflows are exactly what example_workflows/build.py writes, and both formats agree."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "example_workflows"


def _build():
    spec = importlib.util.spec_from_file_location("distdiff_example_build", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_files_match_the_builder():
    for filename, text in _build().render().items():
        assert (ROOT / filename).read_text() == text, f"{filename} is stale: run python example_workflows/build.py"


def test_every_example_has_both_formats_and_they_agree():
    build = _build()
    assert set(build.EXAMPLES) == {"data_parallel", "ulysses", "ring", "device_map_staged", "hybrid_dp_ulysses",
                                  "cfg_parallel", "regional_compile", "step_cache", "lora_chain",
                                  "auto_plan", "single_files"}
    assert set(build.INTEROP_EXAMPLES) == {"img2img", "comfy_vae_decode"}
    for name in (*build.EXAMPLES, *build.INTEROP_EXAMPLES):
        api = json.loads((ROOT / f"{name}.api.json").read_text())
        ui = json.loads((ROOT / f"{name}.json").read_text())
        assert {n["type"] for n in ui["nodes"]} == {v["class_type"] for v in api.values()}
        for node in ui["nodes"]:
            inputs = api[str(node["id"])]["inputs"]
            widgets = [w for w in build.WIDGETS[node["type"]]]
            values = [v for v in node["widgets_values"] if v != "fixed"]
            assert values == [inputs[w] for w in widgets]
            for link in node["inputs"]:
                src = next(l for l in ui["links"] if l[0] == link["link"])
                assert inputs[link["name"]] == [str(src[1]), src[2]]

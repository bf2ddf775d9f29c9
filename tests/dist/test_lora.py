"""LoRA through the real sidecar (gloo ranks) against diffusers in one process with the same LoRAs loaded
(`pipe.load_lora_weights` + `set_adapters`): one LoRA and a chain of two (one kohya-format, one negative strength)
under data parallel and under Ulysses (adapters must wrap the layers before CP places its hooks); a strength change
reloads no base weights; staged offload gives a reloaded transformer its adapters again; removing every LoRA gives
the base image bit for bit; a LoRA that does not fit, or a broken file, is an error naming the file and leaves the
session usable."""

from __future__ import annotations

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError, ModelError
from dist_backend.pipelines import adapter_for
from dist_backend.pipelines.base import ImageRequest
from dist_backend.session import Session

from tests.dist.engine_cases import GUIDANCE, SIZE, STEPS, format_of
from tests.helpers import wait_no_ranks
from tests.lora_fixtures import make_kohya_flux_lora, make_peft_lora

TOL = 1e-4
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]
SEED = 7
CONFIGS = {
    "dp2": dict(world_size=2),
    "ulysses2": dict(world_size=2, ulysses=2),
}


@pytest.fixture(scope="module")
def lora_files(tiny_dirs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("loras")
    broken = root / "broken.safetensors"
    peft = make_peft_lora(tiny_dirs["flux"], "flux", root / "flux_peft.safetensors", seed=1)
    broken.write_bytes(peft.read_bytes()[:200])  # cut off inside the header
    return {
        "peft": peft,
        "kohya": make_kohya_flux_lora(tiny_dirs["flux"], root / "flux_kohya.safetensors", seed=2),
        "kohya_te": make_kohya_flux_lora(tiny_dirs["flux"], root / "flux_kohya_te.safetensors", seed=4,
                                         text_encoder=True),
        "qwen": make_peft_lora(tiny_dirs["qwenimage"], "qwenimage", root / "qwen_peft.safetensors", seed=3),
        "broken": broken,
    }


class DiffusersReference:
    """The plain pipeline in this process with the same LoRAs (`load_lora_weights` + `set_adapters`), image j with
    SEED + j as in the seed contract. One pipeline per family; adapters are deleted after each use and images are
    cached, since both sessions ask for the same ones."""

    def __init__(self, tiny_dirs) -> None:
        self.tiny_dirs = tiny_dirs
        self.pipes: dict = {}
        self.images: dict = {}

    def __call__(self, family: str, prompts: list[str], loras) -> torch.Tensor:
        return torch.cat([self._image(family, j, prompt, tuple((str(p), s) for p, s in loras))
                          for j, prompt in enumerate(prompts)])

    def _image(self, family, j, prompt, loras) -> torch.Tensor:
        key = (family, j, prompt, loras)
        if key not in self.images:
            from diffusers import DiffusionPipeline

            if family not in self.pipes:
                self.pipes[family] = DiffusionPipeline.from_pretrained(self.tiny_dirs[family])
                self.pipes[family].set_progress_bar_config(disable=True)
            pipe = self.pipes[family]
            names = [f"ref{index}" for index in range(len(loras))]
            for name, (path, _) in zip(names, loras):
                pipe.load_lora_weights(path, adapter_name=name)
            if names:
                pipe.set_adapters(names, [strength for _, strength in loras])
            request = ImageRequest(seed=SEED + j, steps=STEPS, guidance=GUIDANCE[family], **SIZE[family])
            # As a ComfyUI LATENT, what the session returns.
            self.images[key] = format_of(self.pipes, family).process_out(adapter_for(family).reference(
                pipe, prompt=prompt, negative_prompt=None, request=request))
            if names:
                pipe.delete_adapters(names)
        return self.images[key]


@pytest.fixture(scope="module")
def diffusers_reference(tiny_dirs) -> DiffusersReference:
    return DiffusersReference(tiny_dirs)


def run(session, model_dir, family, prompts, loras) -> torch.Tensor:
    latents, _ = session.generate(model_dir=model_dir, prompts=prompts, seed=SEED, steps=STEPS,
                                  guidance=GUIDANCE[family], loras=loras, **SIZE[family])
    return latents


def rank_state(session) -> list[dict]:
    return session.sidecar.call("ping", [{}] * session.config.world_size)


@pytest.fixture(scope="module", params=list(CONFIGS))
def session(request):
    session = Session(SessionConfig(threads_per_rank=1, **CONFIGS[request.param]))
    yield request.param, session
    session.close()
    assert not wait_no_ranks(), "ranks left after the session closed"


@pytest.mark.keeps_ranks
def test_flux_lora_chain_matches_diffusers(session, tiny_dirs, lora_files, diffusers_reference):
    name, session = session
    model = tiny_dirs["flux"]
    prompts = PROMPTS[:session.config.dp]  # one image per data-parallel group
    base = run(session, model, "flux", prompts, [])
    pids = session.sidecar_pids()
    cases = [
        ("one LoRA", [(lora_files["peft"], 0.8)]),
        ("chain peft + kohya(-0.6)", [(lora_files["peft"], 0.8), (lora_files["kohya"], -0.6)]),
        ("strength change", [(lora_files["peft"], 0.3), (lora_files["kohya"], -0.6)]),
    ]
    for label, loras in cases:
        latents = run(session, model, "flux", prompts, loras)
        expected = diffusers_reference("flux", prompts, loras)
        diff = float((latents - expected).abs().max())
        print(f"\n[measured] flux {name} {label}: max abs diff vs diffusers with the same LoRAs = {diff:.3e}; "
              f"vs base = {float((latents - base).abs().max()):.3e}")
        assert diff <= TOL
        assert float((latents - base).abs().max()) > 1e-2, "the LoRA changed nothing: the test would prove nothing"
        if session.config.cp_degree > 1:
            assert set(session.last_cp_modes) == {"ulysses"}, session.last_cp_modes  # CP re-enabled after LoRAs
    states = rank_state(session)
    assert session.sidecar_pids() == pids
    assert all(len(s["adapters"]) == 2 for s in states), states
    # Three LoRA sets, one of them a strength change: the base transformer was read from disk once per rank.
    assert [s["loads"]["transformer"] for s in states] == [1] * session.config.world_size, states
    again = run(session, model, "flux", prompts, [])
    assert torch.equal(again, base), "without LoRAs the base model's exact latents must come back"
    assert all(s["adapters"] == [] for s in rank_state(session))


@pytest.mark.keeps_ranks
def test_bad_lora_names_the_file_and_the_session_stays_usable(session, tiny_dirs, lora_files):
    name, session = session
    model = tiny_dirs["flux"]
    prompts = PROMPTS[:1]
    base = run(session, model, "flux", prompts, [])
    calls = session.sidecar.calls
    with pytest.raises(ConfigError, match="broken.safetensors"):
        session.set_loras([(lora_files["broken"], 1.0)])
    transformer_file = next((model / "transformer").glob("*.safetensors"))
    with pytest.raises(ConfigError, match="holds no LoRA layers"):
        session.set_loras([(transformer_file, 1.0)])
    assert session.sidecar.calls == calls, "files the header refuses must not reach the ranks"
    # A Qwen-Image LoRA does not fit Flux: only diffusers can tell, on the ranks (at set time when the transformer
    # is resident, at the next denoise when staged offload loads it then).
    with pytest.raises(ModelError, match="qwen_peft.safetensors"):
        run(session, model, "flux", prompts, [(lora_files["qwen"], 1.0)])
    assert session.loras == ()
    assert torch.equal(run(session, model, "flux", prompts, []), base)


def test_staged_offload_applies_the_loras_to_every_reloaded_transformer(tiny_dirs, lora_files, diffusers_reference):
    """Staged offload releases the transformer after each denoise; the reloaded one must get its adapters again."""
    session = Session(SessionConfig(world_size=1, offload="staged", threads_per_rank=1))
    try:
        base = run(session, tiny_dirs["flux"], "flux", PROMPTS[:1], [])
        loras = [(lora_files["kohya"], 0.9)]
        expected = diffusers_reference("flux", PROMPTS[:1], loras)
        for _ in range(2):
            diff = float((run(session, tiny_dirs["flux"], "flux", PROMPTS[:1], loras) - expected).abs().max())
            assert diff <= TOL
        print(f"\n[measured] flux staged kohya LoRA, second run (reloaded transformer): max abs diff = {diff:.3e}")
        (state,) = rank_state(session)
        assert state["loads"]["transformer"] == 3 and state["adapters"] == [], state  # released again after use
        # Staged: the misfit shows when the denoise stage loads the transformer; the next run is the base again.
        with pytest.raises(ModelError, match="qwen_peft.safetensors"):
            run(session, tiny_dirs["flux"], "flux", PROMPTS[:1], [(lora_files["qwen"], 1.0)])
        assert torch.equal(run(session, tiny_dirs["flux"], "flux", PROMPTS[:1], []), base)
        # A LoRA that also changes the text encoder cannot be applied with the transformer under staged offload.
        with pytest.raises(ModelError, match="flux_kohya_te.safetensors(.|\n)*offload=resident"):
            run(session, tiny_dirs["flux"], "flux", PROMPTS[:1], [(lora_files["kohya_te"], 1.0)])
    finally:
        session.close()


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("session", ["ulysses2"], indirect=True)
def test_lora_with_text_encoder_layers_matches_diffusers(session, tiny_dirs, lora_files, diffusers_reference):
    """A kohya file with CLIP layers (lora_te1_...): diffusers loads those into the text encoder, so the prompt
    embeddings change too; resident ranks apply it before encoding, as the plain pipeline does."""
    name, session = session
    loras = [(lora_files["kohya_te"], 0.7)]
    latents = run(session, tiny_dirs["flux"], "flux", PROMPTS[:1], loras)
    diff = float((latents - diffusers_reference("flux", PROMPTS[:1], loras)).abs().max())
    print(f"\n[measured] flux {name} kohya LoRA with text-encoder layers: max abs diff vs diffusers = {diff:.3e}")
    assert diff <= TOL
    states = rank_state(session)
    assert all(s["adapters"] == [session.loras[0].name] for s in states), states


@pytest.mark.keeps_ranks
@pytest.mark.parametrize("session", ["ulysses2"], indirect=True)
def test_qwenimage_lora_under_ulysses_matches_diffusers(session, tiny_dirs, tiny_pipes, lora_files,
                                                       diffusers_reference):
    from tests.dist.engine_cases import prompts_with_text_length

    name, session = session
    prompts = prompts_with_text_length(tiny_pipes["qwenimage"], divisible_by=2, count=1)
    loras = [(lora_files["qwen"], -0.7)]
    latents = run(session, tiny_dirs["qwenimage"], "qwenimage", prompts, loras)
    diff = float((latents - diffusers_reference("qwenimage", prompts, loras)).abs().max())
    print(f"\n[measured] qwenimage {name} LoRA -0.7: max abs diff vs diffusers = {diff:.3e}")
    assert diff <= TOL
    assert set(session.last_cp_modes) <= {"ulysses", "ulysses_anything"}

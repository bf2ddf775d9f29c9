"""Family adapters on the tiny pipelines: the seed contract (denoise(encode) == plain diffusers call), decode ==
the pipeline's own image output, size checks, sequence lengths and masks. Single process, CPU, float32."""

from __future__ import annotations

import torch
import pytest

from dist_backend.errors import Cancelled, ConfigError
from dist_backend.latent_format import latent_format
from dist_backend.pipelines import Family, adapter_for, load_pipeline, read_model_config
from dist_backend.pipelines.base import ImageRequest

CPU = torch.device("cpu")
PROMPT = "a photo of a cat"
TOL = 1e-5
# Each family's guidance knob is > 1 so that CFG really runs where a negative prompt enables it.
GUIDANCE = {"flux": 3.5, "qwenimage": 4.0, "wan": 5.0}
FRAMES = {"flux": 1, "qwenimage": 1, "wan": 5}


def request(family: str, *, seed: int = 7, guidance: float | None = None, steps: int = 2,
            true_cfg_scale: float = 1.0) -> ImageRequest:
    return ImageRequest(seed=seed, steps=steps, guidance=GUIDANCE[family] if guidance is None else guidance,
                        height=64, width=64, num_frames=FRAMES[family], true_cfg_scale=true_cfg_scale)


CASES = [
    ("flux", None, False), ("flux", "blurry", False), ("flux", "blurry", True),
    ("qwenimage", None, False), ("qwenimage", "low quality", False),
    ("wan", None, False), ("wan", "static", False),
]


@pytest.mark.parametrize("family, negative, true_cfg", CASES)
def test_denoise_of_encode_equals_reference(tiny_pipes, family, negative, true_cfg):
    pipe, a = tiny_pipes[family], adapter_for(family)
    req = request(family, true_cfg_scale=2.0 if true_cfg else 1.0)
    cond = a.encode(pipe, prompt=PROMPT, negative_prompt=negative, device=CPU)
    assert all(v.device.type == "cpu" and v.shape[0] == 1 for v in cond.values())
    steps = []
    latents = a.denoise(pipe, cond=cond, request=req, device=CPU, on_step=lambda i, n, preview: steps.append((i, n)))
    ref = a.reference(pipe, prompt=PROMPT, negative_prompt=negative, request=req)
    diff = (latents - ref).abs().max().item()
    print(f"{family} negative={negative!r} true_cfg={true_cfg}: denoise vs reference max abs diff {diff:.3g}")
    assert latents.dtype == torch.float32 and latents.device.type == "cpu"
    expected_ndim = 4 if family == "flux" else 5  # Qwen-Image: [1, C, 1, h, w], its pipeline's unpacked layout
    assert latents.ndim == expected_ndim and latents.shape[0] == 1
    assert diff <= TOL
    assert steps == [(1, 2), (2, 2)]
    # The seed matters (so the equality above is not trivially true).
    other = a.denoise(pipe, cond=cond, request=request(family, seed=8, true_cfg_scale=req.true_cfg_scale),
                      device=CPU)
    assert (other - latents).abs().max() > 1e-3


def test_negative_prompt_changes_result_only_with_cfg(tiny_pipes):
    """Qwen-Image: the negative prompt matters when guidance > 1 and is ignored at guidance 1 (diffusers' rule)."""
    pipe, a = tiny_pipes["qwenimage"], adapter_for("qwenimage")
    cond = a.encode(pipe, prompt=PROMPT, negative_prompt="low quality", device=CPU)
    plain = a.encode(pipe, prompt=PROMPT, negative_prompt=None, device=CPU)
    run = lambda c, g: a.denoise(pipe, cond=c, request=request("qwenimage", guidance=g), device=CPU)  # noqa: E731
    assert (run(cond, 4.0) - run(plain, 4.0)).abs().max() > 1e-4
    assert torch.equal(run(cond, 1.0), run(plain, 1.0))


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_decode_equals_pipeline_output(tiny_pipes, family):
    pipe, a = tiny_pipes[family], adapter_for(family)
    req = request(family)
    ref = a.reference(pipe, prompt=PROMPT, negative_prompt=None, request=req)
    raw = latent_format({"family": family, "components": {"vae": dict(pipe.vae.config)}}).process_out(ref)
    images = a.decode(pipe, latents=raw, device=CPU)
    knob = {"flux": "guidance_scale", "qwenimage": "true_cfg_scale", "wan": "guidance_scale"}[family]
    extra = {"num_frames": req.num_frames} if family == "wan" else {}
    if hasattr(a, "max_sequence_length"):
        extra["max_sequence_length"] = a.max_sequence_length(pipe)
    out = pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(req.seed), num_inference_steps=req.steps,
               height=req.height, width=req.width, output_type="np", return_dict=False,
               **{knob: req.guidance}, **extra)[0]
    expected = torch.from_numpy(out).reshape(-1, req.height, req.width, 3)
    diff = (images - expected).abs().max().item()
    print(f"{family}: decode vs pipeline output_type='np' max abs diff {diff:.3g}")
    assert images.shape == (req.num_frames, 64, 64, 3) and images.dtype == torch.float32
    assert diff <= TOL
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_cancel_from_on_step_propagates(tiny_pipes):
    pipe, a = tiny_pipes["flux"], adapter_for("flux")
    cond = a.encode(pipe, prompt=PROMPT, negative_prompt=None, device=CPU)
    seen = []

    def on_step(done, total, preview):
        seen.append(done)
        raise Cancelled(f"stop after {done}")

    with pytest.raises(Cancelled):
        a.denoise(pipe, cond=cond, request=request("flux", steps=3), device=CPU, on_step=on_step)
    assert seen == [1]


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_staged_pipeline_gives_the_same_latents(tiny_dirs, tiny_pipes, family):
    """Denoise on a pipeline loaded with only its transformer (no text encoder, no VAE) equals the reference."""
    a = adapter_for(family)
    cond = a.encode(tiny_pipes[family], prompt=PROMPT, negative_prompt="low quality", device=CPU)
    staged = load_pipeline(tiny_dirs[family], components=set(a.denoise_components))
    staged.set_progress_bar_config(disable=True)
    assert staged.vae is None and staged.text_encoder is None and staged.transformer is not None
    latents = a.denoise(staged, cond=cond, request=request(family), device=CPU)
    ref = a.reference(tiny_pipes[family], prompt=PROMPT, negative_prompt="low quality", request=request(family))
    assert (latents - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_img2img_on_the_staged_pipeline_equals_diffusers_img2img(tiny_dirs, tiny_pipes, family):
    """denoise < 1 with init latents, on a transformer-only pipeline (no VAE: the img2img pipeline must still take
    the latents as latents), equals the family's diffusers img2img pipeline on the full pipeline."""
    from diffusers import FluxImg2ImgPipeline, QwenImageImg2ImgPipeline

    a, full = adapter_for(family), tiny_pipes[family]
    fmt = latent_format({"family": family, "components": {"vae": dict(full.vae.config)}})
    init = a.reference(full, prompt="a house", negative_prompt=None, request=request(family, seed=3))
    cond = a.encode(full, prompt=PROMPT, negative_prompt=None, device=CPU)
    staged = load_pipeline(tiny_dirs[family], components=set(a.denoise_components))
    staged.set_progress_bar_config(disable=True)
    req = ImageRequest(seed=5, steps=3, guidance=GUIDANCE[family], height=64, width=64, denoise=0.6)
    steps = []
    got = a.denoise(staged, cond=cond, request=req, device=CPU, init_latents=init,
                    on_step=lambda i, n, preview=None: steps.append((i, n)))
    assert steps == [(1, 2), (2, 2)]  # strength 0.6 of 3 steps: diffusers skips int(3 - 1.8) = 1 step
    cls = FluxImg2ImgPipeline if family == "flux" else QwenImageImg2ImgPipeline
    extra = {"guidance_scale": req.guidance} if family == "flux" else {"true_cfg_scale": req.guidance}
    if family == "flux":
        extra["max_sequence_length"] = a.max_sequence_length(full)
    packed = cls.from_pipe(full)(prompt=PROMPT, image=init if family == "flux" else init[:, :, 0], strength=0.6,
                                 height=64, width=64, num_inference_steps=3,
                                 generator=torch.Generator("cpu").manual_seed(5), output_type="latent",
                                 return_dict=False, **extra)[0]
    expected = full._unpack_latents(packed, 64, 64, full.vae_scale_factor)
    assert got.shape == expected.shape == init.shape
    assert (got - expected).abs().max().item() <= TOL
    assert (got - a.reference(full, prompt=PROMPT, negative_prompt=None, request=req,
                              init_latents=init)).abs().max().item() <= TOL
    # The init image matters, and the result is not the init image.
    assert (got - init).abs().max() > 1e-2
    other = a.denoise(staged, cond=cond, request=req, device=CPU, init_latents=torch.zeros_like(init))
    assert (other - got).abs().max() > 1e-2
    assert fmt.process_out(got).shape == got.shape


def test_initial_noise_is_what_the_pipeline_draws(tiny_pipes):
    """The noise helper uses the pipeline's own prepare_latents with a CPU generator: same on every call/rank."""
    pipe, a = tiny_pipes["flux"], adapter_for("flux")
    n1 = a.initial_noise(pipe, request=request("flux"), dtype=torch.float32)
    n2 = a.initial_noise(pipe, request=request("flux"), dtype=torch.float32)
    assert torch.equal(n1, n2) and n1.shape == (1, 16, 16)  # 64 px / 8 (VAE) / 2 (packing) -> 4x4 tokens of 4*4 ch


# -- json-only planning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, kwargs, words", [
    ("flux", dict(height=60, width=64, num_frames=1), ["height 60", "multiple of 16", "nearest valid height is 64"]),
    ("flux", dict(height=64, width=8, num_frames=1), ["width 8", "nearest valid width is 16"]),
    ("flux", dict(height=64, width=64, num_frames=5), ["num_frames 5", "num_frames 1"]),
    ("qwenimage", dict(height=64, width=100, num_frames=1), ["width 100", "nearest valid width is 96"]),
    ("wan", dict(height=40, width=64, num_frames=5), ["height 40", "multiple of 16", "nearest valid height is 32"]),
    ("wan", dict(height=64, width=64, num_frames=6), ["num_frames 6", "4k+1", "nearest valid num_frames is 5"]),
    ("wan", dict(height=64, width=64, num_frames=8), ["nearest valid num_frames is 9"]),
])
def test_check_size_names_input_and_nearest_value(tiny_dirs, family, kwargs, words):
    config = read_model_config(tiny_dirs[family])
    with pytest.raises(ConfigError) as info:
        adapter_for(family).check_size(config, **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_check_size_accepts_valid_sizes(tiny_dirs, family):
    adapter_for(family).check_size(read_model_config(tiny_dirs[family]), height=64, width=128,
                                   num_frames=FRAMES[family])


def test_sequence_lengths(tiny_dirs, tiny_pipes):
    configs = {f: read_model_config(d) for f, d in tiny_dirs.items()}
    flux = adapter_for("flux")
    cond = flux.encode(tiny_pipes["flux"], prompt=PROMPT, negative_prompt=None, device=CPU)
    assert flux.sequence_lengths(configs["flux"], cond, height=64, width=128, num_frames=1) == {"image": 32, "text": 32}

    qwen = adapter_for("qwenimage")
    lengths = set()
    for prompt in (PROMPT, "a red house", "a small dog on a tree at sunset"):
        cond = qwen.encode(tiny_pipes["qwenimage"], prompt=prompt, negative_prompt="x", device=CPU)
        got = qwen.sequence_lengths(configs["qwenimage"], cond, height=64, width=64, num_frames=1)
        assert got["image"] == 16 and got["text"] == cond["prompt_embeds"].shape[1]
        assert got["negative_text"] == cond["negative_prompt_embeds"].shape[1] != got["text"]
        lengths.add(got["text"])
    assert len(lengths) == 3 and any(n % 2 for n in lengths)  # prompt-dependent, odd lengths occur

    wan = adapter_for("wan")
    cond = wan.encode(tiny_pipes["wan"], prompt=PROMPT, negative_prompt=None, device=CPU)
    # (5-1)/4+1 = 2 latent frames x (64/8/2)^2 patches
    assert wan.sequence_lengths(configs["wan"], cond, height=64, width=64, num_frames=5) == {"video": 32}


def test_uses_attention_mask(tiny_pipes):
    qwen = adapter_for("qwenimage")
    cond = qwen.encode(tiny_pipes["qwenimage"], prompt=PROMPT, negative_prompt="low quality", device=CPU)
    assert cond["prompt_embeds_mask"].bool().all() and not qwen.uses_attention_mask(cond)
    padded = dict(cond, prompt_embeds_mask=torch.cat([cond["prompt_embeds_mask"], torch.zeros(1, 2).long()], 1))
    assert qwen.uses_attention_mask(padded)
    for family in ("flux", "wan"):
        a = adapter_for(family)
        assert not a.uses_attention_mask(a.encode(tiny_pipes[family], prompt=PROMPT, negative_prompt=None, device=CPU))


def test_adapters_declare_family(tiny_dirs):
    for family in Family:
        a = adapter_for(family)
        assert a.name == family.value
        assert read_model_config(tiny_dirs[family.value])["class_name"] in a.pipeline_class_names
    assert adapter_for("wan").is_video and not adapter_for("flux").is_video


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_step_previews_are_x0_estimates_in_comfyui_layout(tiny_pipes, family):
    """Each step offers its x0 estimate in the layout ComfyUI's previewers take (Flux [1, C, h, w]; Qwen-Image and
    Wan one frame, [1, C, 1, h, w]); an Euler step's estimate at the last step is the final latent."""
    pipe, a = tiny_pipes[family], adapter_for(family)
    cond = a.encode(pipe, prompt=PROMPT, negative_prompt=None, device=CPU)
    previews = []
    latents = a.denoise(pipe, cond=cond, request=request(family, steps=3), device=CPU,
                        on_step=lambda done, total, preview: previews.append(preview()))
    frame = latents if family != "wan" else latents[:, :, :1]  # Qwen-Image is [1, C, 1, h, w] already
    assert [p.shape for p in previews] == [frame.shape] * 3
    assert (previews[0] - previews[-1]).abs().max() > 1e-3  # a new estimate each step
    if family != "wan":  # Wan's UniPC keeps the model's x0 prediction, not the final latent
        assert (previews[-1].cpu() - frame).abs().max() < 1e-5

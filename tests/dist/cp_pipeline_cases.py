"""Whole diffusers pipelines (2 denoise steps, latents out) on CP transformers, for cp_rank_script.py.

Text encoders and VAEs are left out (None): the pipelines accept precomputed prompt embeddings and
`output_type="latent"`, which is all the engine needs from them here. Each pipeline runs once before and once after
`enable_context_parallel`, unchanged, with true CFG (cond and uncond are separate transformer calls in these
pipelines, not a batch of 2); Qwen-Image's and Wan's negative prompt has a different token count, so the transformer
sees two sequence lengths per step.
"""

from __future__ import annotations

import torch

from dist_backend.strategies.context_parallel import cp_mode, enable_context_parallel


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)  # fmt: skip
    kwargs = {"prompt_embeds": _embeds(1, 1, 8, 32), "pooled_prompt_embeds": _embeds(2, 1, 16),
              "negative_prompt_embeds": _embeds(3, 1, 8, 32), "negative_pooled_prompt_embeds": _embeds(4, 1, 16),
              "true_cfg_scale": 2.0, "num_images_per_prompt": 2}  # fmt: skip
    # 64 px / VAE factor 8 / 2×2 packing = 4×4 = 16 image tokens; 8 text tokens. FluxPipeline insists on equal
    # prompt/negative shapes (T5 pads both to max_sequence_length anyway).
    return pipe, kwargs, {"image tokens": 16, "text tokens": 8}


def _qwen():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=transformer)  # fmt: skip
    kwargs = {"prompt_embeds": _embeds(5, 1, 8, 32), "prompt_embeds_mask": torch.ones(1, 8, dtype=torch.long),
              "negative_prompt_embeds": _embeds(6, 1, 5, 32),
              "negative_prompt_embeds_mask": torch.ones(1, 5, dtype=torch.long), "true_cfg_scale": 2.0}  # fmt: skip
    # The negative prompt's 5 tokens do not divide 2 ranks: cp_config_for must pick ulysses_anything.
    return pipe, kwargs, {"image tokens": 16, "text tokens": 8, "negative text tokens": 5}


def _wan():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=64,
    )  # fmt: skip
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=transformer)  # fmt: skip
    kwargs = {"prompt_embeds": _embeds(7, 1, 8, 32), "negative_prompt_embeds": _embeds(8, 1, 5, 32),
              "guidance_scale": 2.0, "num_frames": 5}  # fmt: skip
    # 5 frames -> 2 latent frames; 64 px / 8 / 2×2 patch -> 2×4×4 = 32 video tokens (Wan splits no text).
    return pipe, kwargs, {"video tokens": 32}


PIPELINES = {"flux": _flux, "qwen": _qwen, "wan": _wan}


def run_pipeline_case(name: str, family: str, *, mesh, ring: int, ulysses: int) -> dict:
    """The same pipeline call before and after enabling CP; max abs diff of the final latents."""
    pipe, kwargs, seq_lengths = PIPELINES[family]()
    common = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent", "return_dict": False}

    def call() -> torch.Tensor:
        with torch.no_grad():
            return pipe(**kwargs, **common, generator=torch.Generator().manual_seed(0))[0]

    reference = call()
    enable_context_parallel(pipe.transformer, ring=ring, ulysses=ulysses, mesh=mesh, seq_lengths=seq_lengths)
    local_tokens: list[int] = []  # image/video tokens reaching proj_out on this rank: proves the split happened
    pipe.transformer.proj_out.register_forward_pre_hook(lambda _module, args: local_tokens.append(args[0].shape[1]))
    out = call()
    return {
        "name": name,
        "mode": cp_mode(pipe.transformer),
        "max_abs": [float((out - reference).abs().max())],
        "ref_sums": [float(reference.double().sum())],
        "ref_max_abs": [float(reference.abs().max())],
        "shape": list(out.shape),
        "local_tokens": local_tokens,
        "full_tokens": [next(iter(seq_lengths.values()))] * len(local_tokens),
    }

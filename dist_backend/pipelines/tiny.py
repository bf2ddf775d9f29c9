"""Tiny random-weight diffusers pipelines, built offline, for tests and demos.

Each family gets the real pipeline class with real component classes, shrunk to a few hundred kB, with
tokenizers made from an in-memory vocabulary. They are shaped so that what the engine relies on is exercised:

- 4 attention heads in every transformer, so Ulysses degrees 2 and 4 divide them;
- the real VAE scale factors (8 spatially, 4 in time for Wan): a pipeline loaded WITHOUT its VAE (staged
  loading) falls back to 8/4, so a tiny VAE with another factor would make staged runs disagree with full ones;
- short text: Flux's T5 and Wan's UMT5 tokenizers say `model_max_length` 32, which the adapters use as
  max_sequence_length; Qwen-Image's template prefix tokenizes to exactly 34 tokens like the real tokenizer,
  so the prompt decides the text length (odd lengths occur).

`make_tiny` is deterministic given `seed`; `tiny_cached` reuses a complete build or makes one atomically.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

FAMILIES = ("flux", "qwenimage", "wan")
VARIANTS = ("wan22",)  # more layouts of a family: "wan22" is Wan with two experts (Wan 2.2 A14B)

# Bump when a build changes, so caches made by an older version are not reused.
TINY_VERSION = 2
_DONE_MARKER = ".distdiff_tiny_complete"

# The real Qwen-Image prompt template's prefix (system prompt + user turn) is 34 tokens, which the pipeline
# drops (prompt_template_encode_start_idx). These words become single tokens so the tiny tokenizer agrees.
_QWEN_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background a an photo picture cat dog red blue green tree house on in with "
    "at sunset painting small big"
).split()


def _clip_tokenizer():
    """Character-level CLIP tokenizer: every byte-level character, with and without the end-of-word suffix."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def _t5_tokenizer():
    """Character-level Unigram tokenizer in the T5 layout (<pad>=0, </s>=1, <unk>=2); used by Flux and Wan."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(ord("!"), ord("~") + 1)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=32)


def _qwen_tokenizer():
    """Byte-level BPE like Qwen2's, trained in memory on the template words so each becomes one token."""
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Same pre-tokenization as Qwen2Tokenizer, so the merges learnt here apply identically once wrapped.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # Each word alone and after a space ("Ġword"), so both forms end up as single tokens.
    corpus = [" ".join(_QWEN_WORDS), " " + " ".join(_QWEN_WORDS), *_QWEN_WORDS]
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    backend.train_from_iterator(corpus, trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=2048)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    return tok


def _flow_scheduler(**overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**overrides)


def _build_flux():
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok = _clip_tokenizer()
    tok2 = _t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=tok.model_max_length, projection_dim=32,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    # Four levels -> vae_scale_factor 8 like the real Flux VAE; factors as in FLUX.1.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = _flow_scheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)


def _build_qwenimage():
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            # head_dim 8 -> 4 rotary frequencies, split over (time, height, width) like the real mrope.
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
        },
        # The vision special tokens are never used by the text-only encode; keep them inside the vocabulary.
        image_token_id=len(tok) - 1, video_token_id=len(tok) - 1,
        vision_start_token_id=len(tok) - 1, vision_end_token_id=len(tok) - 1,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
    )
    # temperal_downsample of length 3 -> vae_scale_factor 8, the real one; z_dim 16 keeps the real latents_mean/std.
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    # Modelled on Qwen-Image's scheduler config (exponential time shift with a terminal value).
    scheduler = _flow_scheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)


def _build_wan():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = _t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        # Two blocks: UMT5 differs from T5 by a relative attention bias in every block, which is how a single
        # umt5_xxl file is told from a t5xxl one (files.detect); with one block the two look the same.
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    # Wan 2.1 ships UniPC in flow mode; a multistep scheduler also checks that state across steps is kept.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)


def _build_flux_real_vae():
    """Tiny Flux with the REAL FLUX.1 VAE architecture (random weights, 84 M parameters, stored in float16):
    ComfyUI's VAE loader builds only that architecture, so interop tests with its Load VAE / VAE Encode / VAE
    Decode need it. The transformer takes its 16 latent channels (in_channels 64 after 2x2 packing)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    pipe = _build_flux()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKL(  # black-forest-labs/FLUX.1-dev vae/config.json
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    ).to(torch.float16)  # half the disk; loaded as float32 by both ComfyUI and the ranks, from the same values
    pipe.register_modules(transformer=transformer, vae=vae)
    return pipe


# Wan 2.2 A14B T2V's switch: transformer for timesteps >= 0.875 × 1000, transformer_2 below. With the tiny
# scheduler, 3 steps run at timesteps 999 | 857, 600: both experts are used.
WAN22_BOUNDARY_RATIO = 0.875


def _build_wan22():
    """Wan 2.2 A14B's layout: two experts of the same shape with their own weights, and `boundary_ratio`."""
    from diffusers import WanPipeline

    base = _build_wan()
    transformer_2 = type(base.transformer).from_config(base.transformer.config)  # drawn after: other weights
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer, transformer_2=transformer_2,
                       boundary_ratio=WAN22_BOUNDARY_RATIO)


_BUILDERS = {"flux": _build_flux, "qwenimage": _build_qwenimage, "wan": _build_wan,
             "flux-realvae": _build_flux_real_vae, "wan22": _build_wan22}


def make_tiny(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny pipeline of `family` (or of a variant in VARIANTS) with weights drawn from `seed` and save it
    (safetensors) in `out_dir`."""
    import torch

    family = str(getattr(family, "value", family))
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(_BUILDERS)}")
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        pipe = _BUILDERS[family]()
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("built tiny %s pipeline (seed %d) in %s", family, seed, out)
    return out


def tiny_cached(family: str, cache_dir: str | Path, *, seed: int = 0) -> Path:
    """The tiny pipeline of `family` under `cache_dir`, built once.

    The build goes to a temporary sibling folder that is renamed into place only when complete, so a process
    that races us either sees nothing (and builds its own copy) or a complete folder; the loser of the rename
    throws its copy away.
    """
    family = str(getattr(family, "value", family))
    cache = Path(cache_dir)
    final = cache / f"{family}-seed{seed}-v{TINY_VERSION}"
    if (final / _DONE_MARKER).is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        make_tiny(family, tmp, seed=seed)
        (tmp / _DONE_MARKER).write_text("ok\n")
        try:
            os.rename(tmp, final)  # atomic on one filesystem; fails if another process got there first
        except OSError:
            if not (final / _DONE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

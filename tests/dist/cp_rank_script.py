"""One rank of a context-parallel check, started as a real process by tests/dist/test_cp_transformer.py.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/dist/cp_rank_script.py two

Every rank builds the same tiny float32 transformers from config (fixed torch seed), runs each one once in a single
process (the reference), then enables context parallelism through dist_backend.strategies.context_parallel and runs
the same inputs again. It prints one line `RESULT <json>` with, per case, the max abs difference of its own output
against its reference. Several cases share one process group because starting a rank costs ~3 s.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from cp_pipeline_cases import run_pipeline_case
from dist_backend.strategies.context_parallel import (
    build_mesh,
    cp_mode,
    disable_context_parallel,
    enable_context_parallel,
)

HEAD_DIM = 16


def _exit_with_parent() -> None:
    """Leave when the test process dies, so a killed pytest leaves no rank behind."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def make_model(family: str, *, heads: int = 4) -> torch.nn.Module:
    """A tiny model with identical weights on every rank (the seed is fixed before construction)."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    if family == "flux":
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
    elif family == "qwen":
        model = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=heads, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
    else:
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
        )  # fmt: skip
    return model.eval()


def make_inputs(family: str, *, seed: int, batch: int, grid: tuple[int, ...], text: int, mask: list[int] | None):
    """Forward kwargs and the split sequence lengths; `mask` gives each sample's real text length (padding)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    timestep = torch.rand(batch, generator=gen) * 1000
    if family == "wan":
        frames, height, width = grid
        kwargs = {"hidden_states": randn(batch, 4, frames, height, width), "timestep": timestep,
                  "encoder_hidden_states": randn(batch, text, 32)}  # fmt: skip
        return kwargs, {"video tokens": frames * (height // 2) * (width // 2)}
    height, width = grid
    tokens = height * width
    if family == "flux":
        img_ids = torch.zeros(height, width, 3)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        kwargs = {"hidden_states": randn(batch, tokens, 8), "encoder_hidden_states": randn(batch, text, 32),
                  "pooled_projections": randn(batch, 16), "timestep": timestep / 1000,
                  "img_ids": img_ids.reshape(tokens, 3), "txt_ids": torch.zeros(text, 3)}  # fmt: skip
    else:
        kwargs = {"hidden_states": randn(batch, tokens, 16), "encoder_hidden_states": randn(batch, text, 32),
                  "timestep": timestep / 1000, "img_shapes": [[(1, height, width)]] * batch}  # fmt: skip
        if mask is not None:
            kwargs["encoder_hidden_states_mask"] = torch.stack([torch.arange(text) < n for n in mask]).long()
    return kwargs, {"image tokens": tokens, "text tokens": text}


def run_case(name: str, family: str, *, mesh, ring: int, ulysses: int, calls: list[dict], heads: int = 4,
             model: torch.nn.Module | None = None) -> dict:  # fmt: skip
    """Reference forwards, then CP forwards of the same calls on the same model; max abs diff per call."""
    model = model if model is not None else make_model(family, heads=heads)
    prepared = [make_inputs(family, **call) for call in calls]
    with torch.no_grad():
        references = [model(**kwargs, return_dict=False)[0] for kwargs, _ in prepared]
    seq_lengths = {}
    for index, (_, lengths) in enumerate(prepared):
        seq_lengths.update({f"{key} (call {index})": value for key, value in lengths.items()})
    enable_context_parallel(model, ring=ring, ulysses=ulysses, mesh=mesh, seq_lengths=seq_lengths)
    # Tokens reaching proj_out on this rank (before diffusers gathers them): proves the sequence was really split.
    local_tokens: list[int] = []
    handle = model.proj_out.register_forward_pre_hook(lambda _module, args: local_tokens.append(args[0].shape[1]))
    diffs, sums, peaks = [], [], []
    with torch.no_grad():
        for (kwargs, _), reference in zip(prepared, references):
            out = model(**kwargs, return_dict=False)[0]
            assert out.shape == reference.shape, (out.shape, reference.shape)
            diffs.append(float((out - reference).abs().max()))
            sums.append(float(reference.double().sum()))
            peaks.append(float(reference.abs().max()))
    handle.remove()
    split_tokens = [next(iter(lengths.values())) for _, lengths in prepared]  # image/video tokens of each call
    return {"name": name, "mode": cp_mode(model), "max_abs": diffs, "ref_sums": sums, "ref_max_abs": peaks,
            "local_tokens": local_tokens, "full_tokens": split_tokens}  # fmt: skip


def _grid_call(family: str, *, odd: bool = False, **extra) -> dict:
    """A call with even (or deliberately uneven: 15 image/video tokens, 7 text tokens) sequence lengths."""
    if family == "wan":
        call = {"seed": 1, "batch": 1, "grid": (1, 6, 10) if odd else (2, 8, 8), "text": 7, "mask": None}
    else:
        call = {"seed": 1, "batch": 1, "grid": (3, 5) if odd else (4, 4), "text": 7 if odd else 8, "mask": None}
    call.update(extra)
    return call


def scenario_two(rank: int) -> list[dict]:
    """2 ranks: Ulysses, Ring, their uneven modes, odd heads, changing lengths, batch 2, and Ring with a mask."""
    ulysses = build_mesh(device_type="cpu", dp=1, ring=1, ulysses=2)
    ring = build_mesh(device_type="cpu", dp=1, ring=2, ulysses=1)
    out = []
    plans = (("ulysses", ulysses, {"ring": 1, "ulysses": 2}), ("ring", ring, {"ring": 2, "ulysses": 1}))
    for label, mesh, degrees in plans:
        calls = {
            "flux": [_grid_call("flux"), _grid_call("flux", seed=2, batch=2)],
            # the same model sees 8, then 6, then 12 text tokens (and batch 2)
            "qwen": [
                _grid_call("qwen"),
                _grid_call("qwen", text=6, seed=3),
                _grid_call("qwen", batch=2, text=12, seed=4),
            ],
            "wan": [_grid_call("wan"), _grid_call("wan", batch=2, seed=5)],
        }
        for family, family_calls in calls.items():
            out.append(run_case(f"{label}_{family}", family, mesh=mesh, **degrees, calls=family_calls))
        for family in ("flux", "qwen", "wan"):  # uneven lengths: ulysses_anything / ring_anything
            uneven = [_grid_call(family, odd=True)]
            if family != "wan":  # Wan splits no text
                uneven.append(_grid_call(family, odd=True, text=9, seed=6))
            out.append(run_case(f"{label}_anything_{family}", family, mesh=mesh, **degrees, calls=uneven))
    # Odd head count under ulysses_anything (even lengths: the heads alone select the mode).
    out.append(run_case("ulysses_anything_heads3_flux", "flux", mesh=ulysses, ring=1, ulysses=2, heads=3,
                        calls=[_grid_call("flux")]))  # fmt: skip
    # A padding mask (prompts of 5 and 8 tokens padded to 8): right under Ulysses and ulysses_anything ...
    masked = _grid_call("qwen", batch=2, mask=[5, 8], seed=7)
    out.append(run_case("ulysses_mask_qwen", "qwen", mesh=ulysses, ring=1, ulysses=2, calls=[masked]))
    out.append(run_case("ulysses_anything_mask_qwen", "qwen", mesh=ulysses, ring=1, ulysses=2,
                        calls=[_grid_call("qwen", odd=True, batch=2, mask=[4, 7], seed=8)]))  # fmt: skip
    # ... and silently wrong under Ring (the reason for refuse_ring_with_mask).
    out.append(run_case("ring_mask_qwen_known_wrong", "qwen", mesh=ring, ring=2, ulysses=1, calls=[masked]))
    # Whole pipelines, called unchanged after enable_context_parallel (true CFG: two text lengths per step).
    out.append(run_pipeline_case("pipeline_flux", "flux", mesh=ulysses, ring=1, ulysses=2))
    out.append(run_pipeline_case("pipeline_qwen", "qwen", mesh=ulysses, ring=1, ulysses=2))
    out.append(run_pipeline_case("pipeline_wan", "wan", mesh=ring, ring=2, ulysses=1))
    out.append(switch_case(ulysses_mesh=ulysses, ring_mesh=ring))
    return out


def switch_case(*, ulysses_mesh, ring_mesh) -> dict:
    """Ulysses, then disable_context_parallel (alone again: bit-identical), then Ring on the same model."""
    model = make_model("flux")
    kwargs, lengths = make_inputs("flux", **_grid_call("flux"))
    with torch.no_grad():
        reference = model(**kwargs, return_dict=False)[0]
        diffs = []
        for mesh, degrees in ((ulysses_mesh, {"ring": 1, "ulysses": 2}), (ring_mesh, {"ring": 2, "ulysses": 1})):
            enable_context_parallel(model, mesh=mesh, seq_lengths=lengths, **degrees)
            diffs.append(float((model(**kwargs, return_dict=False)[0] - reference).abs().max()))
            disable_context_parallel(model)
            diffs.append(float((model(**kwargs, return_dict=False)[0] - reference).abs().max()))
    return {"name": "switch_ulysses_off_ring_off", "mode": cp_mode(model), "max_abs": diffs}


def scenario_four(rank: int) -> list[dict]:
    """4 ranks: ring×ulysses 2×2 on one group; 2 dp groups × ulysses 2 (and × ring 2), each group its own input."""
    out = []
    mesh = build_mesh(device_type="cpu", dp=1, ring=2, ulysses=2)
    for family in ("flux", "qwen", "wan"):
        calls = [_grid_call(family), _grid_call(family, seed=9, batch=2)]
        if family == "qwen":
            calls.append(_grid_call("qwen", text=12, seed=10))
        out.append(run_case(f"ring2xulysses2_{family}", family, mesh=mesh, ring=2, ulysses=2, calls=calls))
    for label, ring, ulysses in (("dp2xulysses2", 1, 2), ("dp2xring2", 2, 1)):
        mesh = build_mesh(device_type="cpu", dp=2, ring=ring, ulysses=ulysses)
        group = mesh["dp"].get_local_rank()  # each dp group draws its own input
        families = ("flux", "qwen", "wan") if label == "dp2xulysses2" else ("flux",)
        for family in families:
            result = run_case(f"{label}_{family}", family, mesh=mesh, ring=ring, ulysses=ulysses,
                              calls=[_grid_call(family, seed=100 + group)])  # fmt: skip
            result["dp_group"] = group
            out.append(result)
    # Two transformers on the same mesh (Wan 2.2 has transformer and transformer_2): diffusers flattens the
    # (ring, ulysses) mesh once per model.
    out.append(run_case("dp2xring2_second_model_flux", "flux", mesh=mesh, ring=2, ulysses=1,
                        calls=[_grid_call("flux", seed=11)]))  # fmt: skip
    return out


def main() -> int:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    _exit_with_parent()
    torch.set_num_threads(1)  # the test machine has 2 shared cores; 4 ranks must not oversubscribe them
    started = time.monotonic()
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        cases = {"two": scenario_two, "four": scenario_four}[sys.argv[1]](rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print("RESULT " + json.dumps({"rank": rank, "seconds": time.monotonic() - started, "cases": cases}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

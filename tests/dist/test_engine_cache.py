"""Step caching (diffusers' cache hooks) under context parallelism: the first-block cache decides from the whole
CP group's residual, so 2-rank Ulysses skips the same steps as one process with the same cache and gives its latents;
and the group decision itself, on 2 real gloo ranks whose shards alone would decide differently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_backend.config import SessionConfig
from dist_backend.pipelines import adapter_for
from dist_backend.pipelines.base import ImageRequest
from dist_backend.session import Session
from dist_backend.strategies.step_cache import step_cache

from tests.dist.engine_cases import GUIDANCE, SIZE, format_of

TOL = 1e-4
PROMPT = "a red fox in the snow"
STEPS = 8  # enough steps for the cache to skip some and compute others
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode, threshold", [("first_block", 0.3), ("taylorseer", 0.0)])
def test_cached_cp_equals_cached_single_process(mode, threshold, tiny_dirs, tiny_pipes):
    request = ImageRequest(seed=3, steps=STEPS, guidance=GUIDANCE["flux"], **SIZE["flux"])
    pipe = tiny_pipes["flux"]
    with step_cache(pipe.transformer, mode=mode, threshold=threshold, steps=STEPS) as expected_stats:
        expected = adapter_for("flux").reference(pipe, prompt=PROMPT, negative_prompt=None, request=request)
    expected = format_of(tiny_pipes, "flux").process_out(expected)  # the session returns ComfyUI LATENTs
    session = Session(SessionConfig(world_size=2, ulysses=2, threads_per_rank=1, cache=mode,
                                    cache_threshold=threshold))
    try:
        session.load(tiny_dirs["flux"])
        latents = session.denoise(session.encode([PROMPT]), seed=3, steps=STEPS, guidance=GUIDANCE["flux"],
                                  **SIZE["flux"])
        stats, run = session.last_cache_stats, session.last_run
    finally:
        session.close()
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] flux ulysses2 cache={mode}: skipped {stats} vs one process {expected_stats}; "
          f"max abs diff = {diff:.3e}")
    assert 0 < expected_stats.skipped < STEPS  # the cache really skipped some steps and computed others
    assert stats == [{"forwards": STEPS, "skipped": expected_stats.skipped}] * 2
    assert run["forwards_skipped"] == expected_stats.skipped and run["cache"] == mode
    assert diff <= TOL


def test_cached_cfg_parallel_equals_cached_single_process(tiny_dirs, tiny_pipes):
    """cfg 2 × ulysses 2 with the first-block cache (Flux true CFG): each half caches its own branch (the "cond" /
    "uncond" contexts, as in one process) and decides over its own CP group."""
    threshold, negative, true_cfg = 0.3, "blurry, low quality", 2.0
    request = ImageRequest(seed=3, steps=STEPS, guidance=GUIDANCE["flux"], true_cfg_scale=true_cfg, **SIZE["flux"])
    pipe = tiny_pipes["flux"]
    with step_cache(pipe.transformer, mode="first_block", threshold=threshold, steps=STEPS) as expected_stats:
        expected = adapter_for("flux").reference(pipe, prompt=PROMPT, negative_prompt=negative, request=request)
    expected = format_of(tiny_pipes, "flux").process_out(expected)
    session = Session(SessionConfig(world_size=4, cfg=2, ulysses=2, threads_per_rank=1, cache="first_block",
                                    cache_threshold=threshold))
    try:
        session.load(tiny_dirs["flux"])
        latents = session.denoise(session.encode([PROMPT], negative), seed=3, steps=STEPS,
                                  guidance=GUIDANCE["flux"], true_cfg_scale=true_cfg, **SIZE["flux"])
        run = session.last_run
    finally:
        session.close()
    diff = float((latents - expected).abs().max())
    print(f"\n[measured] flux true CFG cfg2×ulysses2 first_block: {run} vs one process {expected_stats}; "
          f"max abs diff = {diff:.3e}")
    assert 0 < expected_stats.skipped < 2 * STEPS
    assert (run["forwards_skipped"], run["forwards_cached"]) == (expected_stats.skipped, 2 * STEPS)
    assert diff <= TOL


GROUP_SCRIPT = r'''
import json, os, torch, torch.distributed as dist
from dist_backend.strategies.step_cache import group_relative_change
dist.init_process_group("gloo")
rank = dist.get_rank()
previous = torch.ones(2, 8)                       # the cached residual: the same magnitude on both shards
full = torch.cat([previous[:1] * 1.01, previous[1:] * 1.5])  # shard 0 barely changed, shard 1 changed a lot
mine, prev = full[rank:rank + 1], previous[rank:rank + 1]
local = float((mine - prev).abs().mean() / prev.abs().mean())  # what diffusers' hook measures on one shard
group = group_relative_change(mine, prev, dist.group.WORLD)
print("RESULT " + json.dumps({"local": local, "group": group,
                             "one_process": float((full - previous).abs().mean() / previous.abs().mean())}))
dist.destroy_process_group()
'''


def test_first_block_decision_is_one_value_per_cp_group(tmp_path):
    """Each shard alone would decide differently at threshold 0.1 (0.01 → skip, 0.5 → compute); over the group
    both ranks get the one-process value 0.255 → compute. Without the reduction this test fails."""
    import socket

    script = tmp_path / "group_decision.py"
    script.write_text(GROUP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)})
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [json.loads(line.split(" ", 1)[1]) for out in outs for line in out.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == 2, outs
    threshold = 0.1
    assert (results[0]["local"] > threshold) != (results[1]["local"] > threshold)  # shards alone disagree
    for r in results:
        assert r["group"] == pytest.approx(r["one_process"], rel=1e-12)
        assert r["group"] > threshold

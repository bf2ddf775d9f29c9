"""Fixtures shared by every test folder: the tiny pipelines (built once per test session, offline) and the
check that no rank process outlives a test."""

from __future__ import annotations

import pytest

from tests.helpers import rank_processes, wait_no_ranks

FAMILIES = ("flux", "qwenimage", "wan")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """family -> folder of its tiny pipeline (seed 0), built into this session's temp dir (isolated, ~0.5 s)."""
    from dist_backend.pipelines.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_pipes(tiny_dirs) -> dict:
    """family -> the full tiny pipeline loaded with DiffusionPipeline.from_pretrained (float32, CPU)."""
    from diffusers import DiffusionPipeline

    pipes = {}
    for family, folder in tiny_dirs.items():
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        pipes[family] = pipe
    return pipes


@pytest.fixture(scope="session")
def wan22(tmp_path_factory) -> tuple:
    """(folder, pipeline): the tiny two-expert Wan (Wan 2.2 A14B's layout: transformer + transformer_2,
    boundary_ratio), built once per test session, and the same pipeline loaded in this process."""
    from diffusers import DiffusionPipeline

    from dist_backend.pipelines.tiny import make_tiny

    folder = make_tiny("wan22", tmp_path_factory.mktemp("tiny") / "wan22", seed=0)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


@pytest.fixture(autouse=True)
def no_rank_left_behind(request):
    """After every test, no rank process may be running unless a module-scoped session fixture still owns it."""
    before = {p.pid for p in rank_processes()}
    yield
    if request.node.get_closest_marker("keeps_ranks"):
        return
    left = wait_no_ranks(ignore=before)
    assert not left, f"rank processes left running after the test: {[p.pid for p in left]}"

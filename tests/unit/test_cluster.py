"""Cluster SPEC, cluster config and token file: bad input is refused with the arithmetic or the fix, before any rank
starts; the token's content never appears in a message."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dist_backend.cluster import ClusterConfig, parse_cluster, read_token, write_token
from dist_backend.config import SessionConfig
from dist_backend.errors import ConfigError
from dist_backend.session import Session

ROOT = Path(__file__).resolve().parents[2]


def test_spec_gives_ranks_in_order():
    spec = parse_cluster(" local:2 ,10.0.0.7:4, 10.0.0.8:1")
    assert spec.world_size == 7 and spec.local_ranks == 2
    assert [(n.host, list(n.ranks)) for n in spec.nodes] == [
        ("local", [0, 1]), ("10.0.0.7", [2, 3, 4, 5]), ("10.0.0.8", [6])]
    assert spec.node_of(5).host == "10.0.0.7" and spec.node_at("10.0.0.8").first_rank == 6
    assert spec.node_at("10.0.0.9") is None and spec.node_of(3).describe() == "node 10.0.0.7 (ranks 2–5)"
    assert parse_cluster(spec.text()) == spec
    # CP groups (consecutive ranks) that cross machines are reported; inside one machine they are not.
    assert spec.groups_across_nodes(2) == []  # 0–1 local, 2–3 and 4–5 on .7, 6 alone on .8
    assert spec.groups_across_nodes(3) == [([0, 1, 2], ["local", "10.0.0.7"])]  # 3–5 all on .7
    assert parse_cluster("local:1, 10.0.0.7:1").groups_across_nodes(2) == [([0, 1], ["local", "10.0.0.7"])]


@pytest.mark.parametrize("text, words", [
    ("", ["cluster is empty"]),
    ("local:2, 10.0.0.7", ["not NODE:RANKS"]),
    ("local:2, 10.0.0.7:x", ["'x' is not an integer"]),
    ("local:0, 10.0.0.7:1", ["at least 1 rank, got 0"]),
    ("10.0.0.7:1, local:1", ["`local` must be the first"]),
    ("10.0.0.7:1, 10.0.0.8:1", ["has no `local` entry", "start with `local:N`"]),
    ("local:1, gpu-box:2", ["'gpu-box' is neither `local` nor an IP address"]),
    ("local:1, 10.0.0.7:1, 10.0.0.7:2", ["names 10.0.0.7 twice"]),
    ("local:2", ["names no other machine"]),
])
def test_bad_spec_is_refused_with_the_fix(text, words):
    with pytest.raises(ConfigError) as err:
        parse_cluster(text)
    for word in words:
        assert word in str(err.value)


def _cluster(tmp_path, spec="local:1, 10.0.0.7:4", **kwargs) -> ClusterConfig:
    token = tmp_path / "t.token"
    if not token.exists():
        write_token(token)
    return ClusterConfig(spec=parse_cluster(spec), listen_host=kwargs.pop("listen_host", "10.0.0.1"),
                         listen_port=kwargs.pop("listen_port", 29600), token_file=token, **kwargs)


def test_world_size_and_host_must_match_the_spec_before_any_rank_starts(tmp_path):
    cluster = _cluster(tmp_path)
    with pytest.raises(ConfigError, match=r"gives 1 \+ 4 = 5 ranks, but world_size is 4"):
        Session(SessionConfig(world_size=4, host="10.0.0.1"), cluster=cluster)
    with pytest.raises(ConfigError, match="host is '127.0.0.1' but the cluster listens on '10.0.0.1'"):
        Session(SessionConfig(world_size=5), cluster=cluster)
    session = Session(SessionConfig(world_size=5, host="10.0.0.1"), cluster=cluster)
    assert not session.alive() and session.starts == 0


@pytest.mark.parametrize("kwargs, words", [
    (dict(listen_host="0.0.0.0"), ["binds every interface"]),
    (dict(listen_host="head.lan"), ["not an IP address"]),
    (dict(listen_port=0), ["port must be 1–65535"]),
    (dict(join_timeout_s=0), ["join_timeout_s must be a positive"]),
])
def test_bad_cluster_config(tmp_path, kwargs, words):
    with pytest.raises(ConfigError) as err:
        _cluster(tmp_path, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_token_file_is_created_0600_and_refused_when_others_can_read_it(tmp_path):
    path = write_token(tmp_path / "t.token")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(read_token(path)) == 32
    secret = path.read_text().strip()
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="mode 0640.*chmod 600") as err:
        read_token(path)
    assert secret not in str(err.value)
    with pytest.raises(FileExistsError):
        write_token(path)  # never overwritten
    short = tmp_path / "short.token"
    short.write_text("abcd")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="2 bytes, fewer than 16"):
        read_token(short)
    text = tmp_path / "text.token"
    text.write_text("my password is hunter2")
    text.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        read_token(text)
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="make-token"):
        read_token(tmp_path / "missing.token")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_backend", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_refuses_bad_cluster_input_with_exit_2(tmp_path):
    token = write_token(tmp_path / "t.token")
    base = ["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "out")]
    run = _cli(*base, "--cluster", "local:1, 10.0.0.7:1")
    assert run.returncode == 2 and "--cluster needs --listen" in run.stderr
    run = _cli(*base, "--cluster", "local:1, 10.0.0.7:2", "--listen", "10.0.0.1:29600", "--token-file", str(token),
               "--world-size", "2")
    assert run.returncode == 2 and "1 + 2 = 3 ranks, but world_size is 2" in run.stderr
    os.chmod(token, 0o644)
    run = _cli("join", "--head", "10.0.0.1:29600", "--token-file", str(token), "--nproc-per-node", "1", "--once")
    assert run.returncode == 2 and "mode 0644" in run.stderr
    assert token.read_text().strip() not in run.stderr + run.stdout
    run = _cli("make-token", "--out", str(tmp_path / "new.token"))
    assert run.returncode == 0 and stat.S_IMODE((tmp_path / "new.token").stat().st_mode) == 0o600
    assert (tmp_path / "new.token").read_text().strip() not in run.stdout + run.stderr


def test_a_listen_address_this_machine_does_not_have_is_refused(tmp_path):
    from dist_backend.launcher import launch

    cluster = _cluster(tmp_path, spec="local:1, 10.0.0.7:1", listen_host="192.0.2.1")  # TEST-NET-1: never ours
    with pytest.raises(ConfigError, match="cannot listen on 192.0.2.1:29600"):
        launch(SessionConfig(world_size=2, host="192.0.2.1"), cluster=cluster)


def test_a_cuda_head_counts_only_its_own_ranks_gpus():
    """`local:2, 10.0.0.7:4` on a 2-GPU head: the head starts ranks 0–1 only, the node's 4 ranks use its own GPUs."""
    from dist_backend.config import check_device_count
    from dist_backend.join_rank import node_gpus

    config = SessionConfig(world_size=6, ulysses=2, device="cuda", dtype="float32", host="10.0.0.1")
    check_device_count(config, count=2, local_ranks=2)  # enough: 2 local ranks × 1 GPU
    with pytest.raises(ConfigError, match=r"world_size \(6\) × gpus_per_rank \(1\) = 6 GPUs \(ids \[0, 1, 2, 3, 4, 5\]\), "
                                          r"but this machine has 2"):
        check_device_count(config, count=2)  # without a cluster every rank is local
    with pytest.raises(ConfigError, match=r"this machine's 2 of the 6 ranks \(cluster `local:2`\) × gpus_per_rank "
                                          r"\(1\) = 2 GPUs \(ids \[0, 1\]\), but it has 1; give `local` fewer ranks"):
        check_device_count(config, count=1, local_ranks=2)
    sharded = SessionConfig(world_size=3, gpus_per_rank=2, device="cuda", dtype="float32", host="10.0.0.1")
    with pytest.raises(ConfigError, match=r"this machine's 2 of the 3 ranks .* = 4 GPUs \(ids \[0, 1, 2, 3\]\), but it "
                                          r"has 3"):
        check_device_count(sharded, count=3, local_ranks=2)
    check_device_count(sharded, count=2, local_ranks=1)
    with pytest.raises(ConfigError, match="no usable CUDA device"):
        check_device_count(config, count=0, local_ranks=2)
    # On a node, its ranks number that machine's GPUs from 0, in blocks of gpus_per_rank.
    assert [node_gpus(r, gpus_per_rank=1) for r in range(4)] == [(0,), (1,), (2,), (3,)]
    assert [node_gpus(r, gpus_per_rank=2) for r in range(2)] == [(0, 1), (2, 3)]

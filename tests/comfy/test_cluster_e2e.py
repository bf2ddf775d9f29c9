"""LoadSharded with a cluster on a real ComfyUI: the server (the head) runs in this, the root, network namespace,
a joined machine in another (tests/netns.py), started by `python -m dist_backend join`. The Ulysses example
workflow across the two machines equals the same workflow on this machine alone; Release GPUs releases the remote
rank too; a SPEC whose ranks do not add up, a cluster without listen/token_file and a bad cluster.json are
refused with the fix before any rank starts.

Modern host only (the issue's host; the 2024 host runs the same V1 node, and each host costs two sidecar starts
with a remote rank). Needs root and iproute2 like tests/dist/test_multinode.py (marker `multinode`)."""

from __future__ import annotations

import io
import json
import os
import socket
import sys

import numpy as np
import pytest
from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from dist_backend.cluster import write_token  # noqa: E402
from tests.helpers import wait_no_ranks  # noqa: E402
from tests.netns import cmdline, namespace_network, wait_until  # noqa: E402

# keeps_ranks: the module server keeps its last sidecar up between tests; the fixture releases it and checks.
pytestmark = [pytest.mark.modern_host, pytest.mark.multinode, pytest.mark.keeps_ranks]
TINY_NAME = "distdiff-tiny-flux"
TAG = (os.getpid() + 1) % 10000  # not the tag of test_multinode's network, should both modules run in one process


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    with namespace_network(tag=TAG, machines=1, log_dir=tmp_path_factory.mktemp("joins")) as net:
        yield net


@pytest.fixture(scope="module")
def setup(network, comfy_module_server_factory, tiny_dirs, tmp_path_factory):
    """(server, head ADDRESS:PORT, token file, cluster.json path) with machine 1's `join` serving the head."""
    root = tmp_path_factory.mktemp("cluster-comfy")
    (root / "models").mkdir()
    (root / "models" / TINY_NAME).symlink_to(tiny_dirs["flux"], target_is_directory=True)
    token = write_token(root / "cluster.token")
    with socket.socket() as s:
        s.bind((network.head, 0))
        head = f"{network.head}:{s.getsockname()[1]}"
    cluster_file = root / "cluster.json"  # written by the test that needs it
    server = comfy_module_server_factory(model_paths={"diffusers": [str(root / "models")]},
                                         env={"DISTDIFF_CLUSTER_FILE": str(cluster_file)})
    network.machines[0].ensure_join(head, token)
    yield server, head, token, cluster_file
    server._http("POST", "/distdiff/release", {})
    assert not wait_no_ranks(), "ranks left after /distdiff/release"


def workflow(**load_inputs) -> dict:
    prompt = json.loads((REPO_ROOT / "example_workflows" / "ulysses.api.json").read_text())
    load = next(v for v in prompt.values() if v["class_type"] == "LoadSharded")
    load["inputs"].update(load_inputs)
    return prompt


def error_of(server, prompt: dict) -> str:
    _, events = server.run(prompt, timeout=60)
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors and errors[0]["node_type"] == "LoadSharded", [e["type"] for e in events]
    return errors[0]["exception_message"]


def pixels(server, prompt: dict) -> list[np.ndarray]:
    from PIL import Image

    prompt_id, events = server.run(prompt, timeout=240)
    assert "execution_error" not in [e["type"] for e in events], \
        [e["data"] for e in events if e["type"] == "execution_error"]
    outputs = server.history(prompt_id)["outputs"]
    return [np.asarray(Image.open(io.BytesIO(server.view(i["filename"], i["subfolder"], i["type"]))))
            for out in outputs.values() for i in out.get("images", [])]


def test_bad_cluster_settings_are_refused_with_the_fix(setup, network):
    server, head, token, cluster_file = setup
    node = network.machines[0].address
    message = error_of(server, workflow(ranks=4, cluster=f"local:1, {node}:1", listen=head, token_file=str(token)))
    assert "gives 1 + 1 = 2 ranks, but world_size is 4" in message
    message = error_of(server, workflow(cluster=f"local:1, {node}:1"))
    assert "needs listen and token_file" in message
    # cluster.json: read when the node's cluster input is empty; the token itself has no place there.
    cluster_file.write_text(json.dumps({"cluster": f"local:1, {node}:1", "token": token.read_text().strip()}))
    try:
        message = error_of(server, workflow())
        assert "unknown key(s) ['token']" in message and token.read_text().strip() not in message
        cluster_file.write_text(json.dumps({"cluster": f"local:2, {node}:1", "listen": head,
                                            "token_file": str(token)}))
        assert "gives 2 + 1 = 3 ranks, but world_size is 2" in error_of(server, workflow())
    finally:
        cluster_file.unlink()


def test_a_workflow_across_two_machines_equals_the_local_one_and_release_frees_the_remote_rank(setup, network):
    server, head, token, _ = setup
    machine = network.machines[0]
    across = pixels(server, workflow(cluster=f"local:1, {machine.address}:1", listen=head, token_file=str(token)))
    assert machine.ranks(), "the remote rank should stay up between runs, like local ones"
    # The status route has a row for the remote rank: the node's address, its pid on that machine, the memory
    # the rank reported itself (namespaces share the pid namespace, so that pid can be checked here).
    rows = json.loads(server._http("GET", "/distdiff/status"))["ranks"]
    assert [(r["rank"], r["node"], r["remote"]) for r in rows] == [(0, "local", False), (1, machine.address, True)]
    assert rows[1]["pid"] in machine.ranks() and rows[1]["device"] == "cpu", rows
    assert all(r["rss_bytes"] > 50 << 20 and r["hostname"] for r in rows), rows
    # Release GPUs (the node) stops the remote rank too: the node is back to its join, waiting.
    release = {"1": {"class_type": "DistDiffReleaseGPUs", "inputs": {}}}
    _, events = server.run(release, timeout=60)
    assert "execution_error" not in [e["type"] for e in events]
    assert wait_until(machine.only_join_left, 20), [cmdline(p) for p in machine.pids()]
    assert not wait_no_ranks()
    local = pixels(server, workflow())
    assert len(across) == len(local) == 1
    diff = int(np.abs(across[0].astype(int) - local[0].astype(int)).max())
    print(f"\n[measured] ComfyUI Ulysses 2 across two namespaces vs local: max pixel diff {diff}")
    assert diff == 0

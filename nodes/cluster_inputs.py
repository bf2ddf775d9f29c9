"""The inputs that put a loader's ranks on several machines, declared once, and the one function that turns them
(or `cluster.json` next to the pack) into the engine's ClusterConfig. The other machines run
`python -m dist_backend join --head LISTEN --token-file FILE --nproc-per-node N` (README, docs/DESIGN.md).

cluster.json (optional, in the pack's folder beside README.md, or the file $DISTDIFF_CLUSTER_FILE names; every key
optional, a node input that is not empty wins over its key):

    {"cluster": "local:2, 10.0.0.7:4", "listen": "10.0.0.1:29600", "token_file": "/home/me/.distdiff.token",
     "join_timeout_s": 300}

Only the token file's path is ever in a workflow or in cluster.json, never the token.
"""

from __future__ import annotations

import json
import os

OPTIONAL = {
    "cluster": ("STRING", {"default": "",
                           "tooltip": "Machines and their ranks in rank order, e.g. local:2, 10.0.0.7:4 (each other "
                                      "machine runs python -m dist_backend join). ranks must equal the sum. Empty = "
                                      "this machine only (or cluster.json next to the pack)."}),
    "listen": ("STRING", {"default": "",
                          "tooltip": "This machine's ADDRESS:PORT on the machines' network, the one each join's "
                                     "--head names, e.g. 10.0.0.1:29600."}),
    "token_file": ("STRING", {"default": "",
                              "tooltip": "Path of the cluster token file (mode 0600, from make-token; the same token "
                                         "on every machine). Only the path: the token never goes in a workflow."}),
}
NAMES = tuple(OPTIONAL)
CLUSTER_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster.json")
ENV_CLUSTER_FILE = "DISTDIFF_CLUSTER_FILE"  # another place for it (a pack folder the user cannot write, tests)
_FILE_KEYS = {"cluster": str, "listen": str, "token_file": str, "join_timeout_s": (int, float)}


def cluster_file() -> str:
    return os.environ.get(ENV_CLUSTER_FILE) or CLUSTER_FILE


def read_cluster_file(path: str | None = None) -> dict:
    """cluster.json's settings ({} when there is no such file), checked against the schema above."""
    from ..dist_backend.errors import ConfigError

    path = path or cluster_file()
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc}); see README (More machines) for its keys") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object with keys {sorted(_FILE_KEYS)}")
    unknown = sorted(set(data) - set(_FILE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; the keys are {sorted(_FILE_KEYS)} (the token itself "
                          "never goes here, only token_file)")
    for key, kind in _FILE_KEYS.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise ConfigError(f"{path}: {key} must be {'a number' if key == 'join_timeout_s' else 'a string'}, "
                              f"got {data[key]!r}")
    return data


def cluster_config(settings: dict, *, path: str | None = None):
    """The ClusterConfig of a loader's inputs over cluster.json, or None for ranks on this machine only."""
    from ..dist_backend.cluster import ClusterConfig, parse_address, parse_cluster
    from ..dist_backend.errors import ConfigError

    given = {k: str(settings.get(k) or "").strip() for k in NAMES}
    merged = {**read_cluster_file(path), **{k: v for k, v in given.items() if v}}
    spec = str(merged.get("cluster", "")).strip()
    if not spec:
        extra = [k for k in ("listen", "token_file") if given[k]]
        if extra:
            raise ConfigError(f"{' and '.join(extra)} only make sense with cluster; name the machines there "
                              "(e.g. local:2, 10.0.0.7:4) or clear them")
        return None
    missing = [k for k in ("listen", "token_file") if not str(merged.get(k, "")).strip()]
    if missing:
        raise ConfigError(f"cluster {spec!r} needs {' and '.join(missing)}: listen = this machine's ADDRESS:PORT on "
                          "the machines' network, token_file = the path of the token made by make-token")
    host, port = parse_address(str(merged["listen"]).strip(), what="listen")
    extra = {"join_timeout_s": float(merged["join_timeout_s"])} if "join_timeout_s" in merged else {}
    return ClusterConfig(spec=parse_cluster(spec), listen_host=host, listen_port=port,
                         token_file=os.path.expanduser(str(merged["token_file"]).strip()), **extra)


def with_cluster(config, cluster):
    """`config` with the host its ranks meet on: the listen address when the ranks span machines."""
    import dataclasses

    return config if cluster is None else dataclasses.replace(config, host=cluster.listen_host)


def file_fingerprint(path: str | None = None) -> str:
    """Changes when cluster.json does (for IS_CHANGED): its size and modification time, empty when absent."""
    try:
        st = os.stat(path or cluster_file())
    except OSError:
        return ""
    return f"|cluster.json:{st.st_size}:{st.st_mtime_ns}"

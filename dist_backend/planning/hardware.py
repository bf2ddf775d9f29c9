"""The GPUs a plan is for: a small typed description, read from text (the CLI) or from the machine.

`Gpus` is plain data, so the planner stays a pure function; `detect_gpus` is the one place that asks torch (and
NVML when installed) about the real devices.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass
from decimal import Decimal

from ..errors import ConfigError

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
# Bytes per memory unit, as accelerate reads them (GB/MB powers of ten, GiB/MiB of two); "" is a bare number of
# bytes. The one table for every memory size a user writes (--gpu-memory here, max_memory in placement.py).
SIZE_UNITS = {"": 1, "GB": 10**9, "GIB": 2**30, "MB": 10**6, "MIB": 2**20}


class Interconnect(str, enum.Enum):
    """How the GPUs exchange tensors: NVLink (or another direct peer link) or only PCIe through the host."""

    NVLINK = "nvlink"
    PCIE = "pcie"


@dataclass(frozen=True, kw_only=True)
class Gpus:
    """The GPUs one plan may use, all alike."""

    count: int
    """Number of GPUs (every one is used: the plan's degrees multiply to this)."""
    memory: int
    """Bytes of memory of each GPU (its total; the planner keeps a reserve, see costs.RESERVE_BYTES)."""
    interconnect: Interconnect = Interconnect.PCIE
    """NVLink or PCIe; PCIe is the safe assumption when unknown."""
    flops: float = 0.0
    """Published dense bf16 FLOP/s of one GPU; 0 = the typical GPU of this memory size (costs.TYPICAL_GPUS)."""
    name: str = ""
    """The device's name when known (reasons mention it)."""
    per_node: tuple[int, ...] = ()
    """GPUs of each machine in rank order when they are on several machines (a cluster: ranks 0… on the first
    machine, as `cluster.parse_cluster` orders them); empty = all on one machine. `interconnect` is the link inside
    a machine; between machines the network (costs.INTER_NODE_BANDWIDTH)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "interconnect", _interconnect(self.interconnect))
        object.__setattr__(self, "per_node", tuple(self.per_node))
        if type(self.count) is not int or self.count < 1:
            raise ConfigError(f"gpus must be an integer ≥ 1, got {self.count!r}")
        if self.per_node and (any(type(n) is not int or n < 1 for n in self.per_node)
                              or sum(self.per_node) != self.count):
            raise ConfigError(f"GPUs per machine {' + '.join(map(str, self.per_node))} = {sum(self.per_node)}, but "
                              f"gpus is {self.count}; give each machine's GPU count (at least 1), summing to gpus")
        if type(self.memory) is not int or self.memory < 10**9:
            raise ConfigError(f"gpu memory must be at least 1 GB, got {self.memory!r} bytes; write e.g. '24GB'")
        if self.flops < 0:
            raise ConfigError(f"gpu flops must be ≥ 0 (0 = typical for the memory size), got {self.flops!r}")


    @property
    def nodes(self) -> int:
        """Machines the GPUs are on."""
        return len(self.per_node) or 1

    def spans_machines(self, width: int) -> bool:
        """Whether some block of `width` consecutive GPUs (GPUs 0…width-1, width…2·width-1, …: the rank groups of
        a dp-major mesh) lies on more than one machine."""
        if self.nodes == 1 or width <= 1:
            return False
        machine = [m for m, n in enumerate(self.per_node) for _ in range(n)]
        return any(machine[start] != machine[start + width - 1] for start in range(0, self.count, width))

    @classmethod
    def on_machines(cls, *, nodes: int, count: int, **kwargs) -> Gpus:
        """`count` GPUs spread evenly over `nodes` machines (ConfigError when they do not divide)."""
        if type(nodes) is not int or nodes < 1:
            raise ConfigError(f"nodes must be an integer ≥ 1, got {nodes!r}")
        if count % nodes:
            raise ConfigError(f"{count} GPUs do not spread evenly over {nodes} machines ({count} / {nodes} is not "
                              "whole); give the GPUs of each machine instead (a cluster SPEC such as 'local:4, "
                              "10.0.0.7:2')")
        return cls(count=count, per_node=(count // nodes,) * nodes if nodes > 1 else (), **kwargs)


def _interconnect(value) -> Interconnect:
    try:
        return Interconnect(getattr(value, "value", value))
    except ValueError:
        raise ConfigError(f"interconnect={value!r} is not one of: nvlink, pcie") from None


def parse_memory(text: str) -> int:
    """"24GB" -> 24_000_000_000 bytes; GB/MB are powers of ten, GiB/MiB of two; a bare number means GB."""
    match = _SIZE.match(str(text))
    # A bare GPU memory is in GB (nobody has a 24-byte GPU); otherwise the shared units.
    unit = match and (10**9 if not match.group(2) else SIZE_UNITS.get(match.group(2).upper()))
    if not match or unit is None:
        raise ConfigError(f"gpu memory {text!r} cannot be read; write e.g. '24GB', '80GB' or '48GiB'")
    return int(Decimal(match.group(1)) * unit)


def detect_gpus(device_ids: tuple[int, ...] | None = None) -> Gpus:
    """The CUDA devices of this machine (or `device_ids` of them) as a `Gpus`. Memory is the smallest total among
    them; the interconnect is NVLink only when NVML reports an active NVLink on every GPU (peer access alone does
    not tell NVLink from PCIe peer-to-peer). ConfigError when there is no CUDA device."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise ConfigError("no CUDA device on this machine: give --gpus, --gpu-memory and --interconnect to plan for "
                          "GPUs elsewhere")
    ids = tuple(device_ids) if device_ids else tuple(range(torch.cuda.device_count()))
    props = [torch.cuda.get_device_properties(i) for i in ids]
    name = props[0].name
    return Gpus(count=len(ids), memory=min(p.total_memory for p in props), interconnect=_nvlink_or_pcie(ids),
                flops=_published_flops(name), name=name)


def _published_flops(name: str) -> float:
    from .costs import KNOWN_GPUS

    for part, flops in sorted(KNOWN_GPUS.items(), key=lambda kv: -len(kv[0])):
        if part.lower() in name.lower():
            return flops
    return 0.0


def _nvlink_or_pcie(ids: tuple[int, ...]) -> Interconnect:
    if len(ids) < 2:
        return Interconnect.PCIE  # nothing to exchange
    try:
        import pynvml
    except ImportError:
        log.info("pynvml is not installed: assuming PCIe between GPUs (pass the interconnect to override)")
        return Interconnect.PCIE
    try:
        pynvml.nvmlInit()
        for i in ids:
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            if pynvml.nvmlDeviceGetNvLinkState(handle, 0) != pynvml.NVML_FEATURE_ENABLED:
                return Interconnect.PCIE
        return Interconnect.NVLINK
    except pynvml.NVMLError as exc:  # no NVLink on the device raises NotSupported
        log.info("NVML reports no NVLink (%s): assuming PCIe", exc)
        return Interconnect.PCIE
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass

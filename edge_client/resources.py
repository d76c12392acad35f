"""Probe the device: memory (lowered by the cgroup limit), usable CPUs, accelerator, disk.

`import edge_client.resources` never imports torch; `probe(accelerator=True)` imports it only
when it is installed, to ask whether it sees a GPU. A `DeviceProfile` can also be built by
hand for a simulated device, e.g. ``DeviceProfile.simulated(memory_bytes=4 * 2**30)``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

__all__ = ["DeviceProfile", "CgroupLimits", "probe", "read_cgroup_limits", "usable_cpus"]

# cgroup v1 reports "no limit" as a page-rounded LONG_MAX; anything this large is unlimited.
_UNLIMITED = 1 << 60


@dataclass(kw_only=True)
class CgroupLimits:
    version: int | None = None          # 1, 2 or None when no memory controller was found
    memory_limit_bytes: int | None = None   # None: unlimited
    memory_usage_bytes: int | None = None
    cpu_quota: float | None = None      # CPUs the quota allows (quota / period); None: unlimited


@dataclass(kw_only=True)
class DeviceProfile:
    """What a device offers for training. JSON-serialisable (`to_dict`, `to_json`, `from_dict`)."""
    total_memory_bytes: int
    available_memory_bytes: int
    cgroup_version: int | None = None
    cgroup_limit_bytes: int | None = None
    cgroup_usage_bytes: int | None = None
    cpus: int = 1
    logical_cpus: int = 1
    cpu_freq_mhz: float | None = None
    accelerator: str | None = None          # e.g. "cuda:0 NVIDIA H100"; None: CPU only
    accelerator_total_bytes: int | None = None
    accelerator_free_bytes: int | None = None
    disk_free_bytes: int | None = None
    platform: str = field(default_factory=lambda: f"{platform.system()} {platform.machine()}")
    is_simulated: bool = False

    def __post_init__(self) -> None:
        for name in ("total_memory_bytes", "available_memory_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DeviceProfile.{name} must be a non-negative int, got {value!r}")
        if self.available_memory_bytes > self.total_memory_bytes:
            raise ValueError(f"DeviceProfile.available_memory_bytes ({self.available_memory_bytes}) exceeds "
                             f"total_memory_bytes ({self.total_memory_bytes})")
        for name in ("cpus", "logical_cpus"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DeviceProfile.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.cpu_freq_mhz is not None and not self.cpu_freq_mhz > 0:
            self.cpu_freq_mhz = None  # VMs report 0: unknown

    @property
    def memory_budget_bytes(self) -> int:
        """Memory training may use on the device it runs on (accelerator memory when there is one)."""
        if self.accelerator is not None and self.accelerator_free_bytes is not None:
            return self.accelerator_free_bytes
        budget = self.available_memory_bytes
        if self.cgroup_limit_bytes is not None:
            budget = min(budget, max(0, self.cgroup_limit_bytes - (self.cgroup_usage_bytes or 0)))
        return budget

    @classmethod
    def simulated(cls, *, memory_bytes: int, cpus: int = 1, total_memory_bytes: int | None = None,
                  accelerator: str | None = None) -> "DeviceProfile":
        """A hand-made profile for a simulated device whose free memory is `memory_bytes`."""
        return cls(total_memory_bytes=max(memory_bytes, total_memory_bytes or 0),
                   available_memory_bytes=memory_bytes, cpus=cpus, logical_cpus=cpus,
                   accelerator=accelerator,
                   accelerator_total_bytes=memory_bytes if accelerator else None,
                   accelerator_free_bytes=memory_bytes if accelerator else None,
                   platform="simulated", is_simulated=True)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["memory_budget_bytes"] = self.memory_budget_bytes
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceProfile":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("max", "-1", ""):
        return None
    try:
        value = int(text.split()[0])
    except ValueError:
        return None
    return None if value < 0 or value >= _UNLIMITED else value


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller -> path from /proc/self/cgroup ('' key for the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def _candidates(base: Path, rel: str | None) -> list[Path]:
    out = []
    if rel and rel != "/":
        out.append(base / rel.lstrip("/"))
    out.append(base)
    return out


def read_cgroup_limits(root: str | os.PathLike = "/sys/fs/cgroup",
                       proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> CgroupLimits:
    """Memory and CPU limits from cgroup v2 (``memory.max``), else v1 (``memory/memory.limit_in_bytes``)."""
    root, paths = Path(root), _cgroup_paths(Path(proc_cgroup))
    for d in _candidates(root, paths.get("")):
        if (d / "memory.max").exists():
            cpu = None
            try:
                quota, period = (d / "cpu.max").read_text().split()[:2]
                if quota != "max":
                    cpu = int(quota) / int(period)
            except (OSError, ValueError):
                pass
            return CgroupLimits(version=2, memory_limit_bytes=_read_int(d / "memory.max"),
                                memory_usage_bytes=_read_int(d / "memory.current"), cpu_quota=cpu)
    for d in _candidates(root / "memory", paths.get("memory")):
        if (d / "memory.limit_in_bytes").exists():
            cpu = None
            for c in _candidates(root / "cpu", paths.get("cpu")):
                quota, period = _read_int(c / "cpu.cfs_quota_us"), _read_int(c / "cpu.cfs_period_us")
                if quota and period:
                    cpu = quota / period
                    break
            return CgroupLimits(version=1, memory_limit_bytes=_read_int(d / "memory.limit_in_bytes"),
                                memory_usage_bytes=_read_int(d / "memory.usage_in_bytes"), cpu_quota=cpu)
    return CgroupLimits()


def usable_cpus(cpu_quota: float | None = None) -> int:
    """CPUs this process may run on: its affinity mask, lowered by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = psutil.cpu_count(logical=True) or 1
    if cpu_quota:
        n = min(n, max(1, int(cpu_quota + 0.999)))
    return max(1, n)


def _accelerator() -> tuple[str | None, int | None, int | None]:
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return None, None, None
    import torch
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return f"cuda:0 {torch.cuda.get_device_name(0)}", int(total), int(free)
    return None, None, None


def probe(*, accelerator: bool = True, disk_path: str | os.PathLike = ".",
          cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
          proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> DeviceProfile:
    """Measure this machine. `accelerator=False` skips the (torch-importing) GPU check."""
    vm = psutil.virtual_memory()
    limits = read_cgroup_limits(cgroup_root, proc_cgroup)
    total, available = int(vm.total), int(vm.available)
    if limits.memory_limit_bytes is not None:
        total = min(total, limits.memory_limit_bytes)
        available = min(available, total)
    try:
        freq = psutil.cpu_freq()
        mhz = float(freq.current) if freq and freq.current else None
    except (OSError, NotImplementedError, AttributeError):
        mhz = None
    name, acc_total, acc_free = _accelerator() if accelerator else (None, None, None)
    try:
        disk = int(shutil.disk_usage(disk_path).free)
    except OSError:
        disk = None
    return DeviceProfile(total_memory_bytes=total, available_memory_bytes=available,
                         cgroup_version=limits.version, cgroup_limit_bytes=limits.memory_limit_bytes,
                         cgroup_usage_bytes=limits.memory_usage_bytes,
                         cpus=usable_cpus(limits.cpu_quota), logical_cpus=psutil.cpu_count(logical=True) or 1,
                         cpu_freq_mhz=mhz, accelerator=name, accelerator_total_bytes=acc_total,
                         accelerator_free_bytes=acc_free, disk_free_bytes=disk)

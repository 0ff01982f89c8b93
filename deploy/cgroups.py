"""cgroup v1 CPU quotas for the testbed tiers (/sys/fs/cgroup/cpu/NAME): a tier limited to ``cpus`` CPUs
runs ``cpus x period`` microseconds per ``period``, so a device at 0.2 is ~5x slower than a full core.
Plain file writes: the kernel interface is three files, no library needed."""
from __future__ import annotations

import os
import time
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


def _check_root() -> None:
    if not (CPU_ROOT / "cgroup.procs").exists():
        raise OSError(f"cgroup v1 cpu controller not mounted at {CPU_ROOT} (needed for CPU quotas)")


def path_of(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad cgroup name {name!r}")
    return CPU_ROOT / name


def create(name: str, cpus: float | None) -> Path:
    """Make (or reuse) the group; ``cpus`` None or <= 0 means no quota."""
    _check_root()
    group = path_of(name)
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    quota = -1 if not cpus or cpus <= 0 else max(1000, int(round(cpus * PERIOD_US)))
    (group / "cpu.cfs_quota_us").write_text(str(quota))
    return group


def quota_cpus(name: str) -> float | None:
    group = path_of(name)
    quota = int((group / "cpu.cfs_quota_us").read_text())
    period = int((group / "cpu.cfs_period_us").read_text())
    return None if quota < 0 else quota / period


def add_pid(name: str, pid: int) -> None:
    (path_of(name) / "cgroup.procs").write_text(str(pid))


def joiner(name: str):
    """A ``preexec_fn`` that moves the child into the group before it execs, so no instruction of the
    daemon runs outside its quota (children it forks stay in the group)."""
    procs = str(path_of(name) / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as handle:
            handle.write(str(os.getpid()))

    return join


def pids(name: str) -> list[int]:
    try:
        text = (path_of(name) / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split()]


def list_groups(prefix: str) -> list[str]:
    if not CPU_ROOT.is_dir():
        return []
    return sorted(p.name for p in CPU_ROOT.iterdir() if p.is_dir() and p.name.startswith(prefix))


def remove(name: str, wait_s: float = 2.0) -> None:
    """rmdir the group once its processes are gone (the kernel refuses while any remain)."""
    group = path_of(name)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise OSError(f"cannot remove cgroup {group}: still has processes {pids(name)}") from None
            time.sleep(0.05)

"""cgroup v1 CPU quotas for the testbed tiers (/sys/fs/cgroup/cpu/NAME): a tier limited to ``cpus`` CPUs
runs ``cpus x period`` microseconds per ``period``, so a device at 0.2 is ~5x slower than a full core.
The period is 10 ms, not the kernel's 100 ms default: a request's compute is then throttled in 10 ms
slices, and latencies of a few hundred ms are no longer rounded to the 100 ms grid a long period leaves
(measured in bench/e2e.py: medians at 0.1 CPU moved in 100 ms steps). A quota below the kernel's 1 ms
minimum stretches the period instead.
Plain file writes: the kernel interface is three files, no library needed."""
from __future__ import annotations

import os
import time
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 10_000
MIN_QUOTA_US = 1_000  # the kernel refuses a smaller cpu.cfs_quota_us


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
    period, quota = period_and_quota_us(cpus)
    # lower the quota first: the kernel checks the pair on every write, and a parent-less group accepts both
    (group / "cpu.cfs_quota_us").write_text("-1")
    (group / "cpu.cfs_period_us").write_text(str(period))
    (group / "cpu.cfs_quota_us").write_text(str(quota))
    return group


def period_and_quota_us(cpus: float | None) -> tuple[int, int]:
    """(cpu.cfs_period_us, cpu.cfs_quota_us) for ``cpus`` CPUs; quota -1 means unlimited."""
    if not cpus or cpus <= 0:
        return PERIOD_US, -1
    period = max(PERIOD_US, int(round(MIN_QUOTA_US / cpus)))
    return period, int(round(cpus * period))


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

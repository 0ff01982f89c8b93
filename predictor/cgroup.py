"""A CPU-quota tier for tests and demos: a cgroup v1 ``cpu`` child with a CFS quota.

Quota choice: ``cfs_quota_us = 2500`` per ``cfs_period_us = 10000`` is 25% of *one* CPU. The tiers
profile at one torch thread, so one CPU is what an unthrottled tier gets and this makes it about 4x
slower (5000 would be 25% of this 2-core machine, i.e. no slowdown for a one-thread process). The period
is the testbed's 10 ms (``deploy.cgroups``), not the kernel's 100 ms: with 100 ms a segment of a few ms
ran either unthrottled or into a 75 ms stall, and the calibrated predictor was within 10% on 26% of the
segments timed in the cgroup.
Only child processes are moved into the cgroup (they write their own pid before exec'ing the work);
the cgroup is removed on exit.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from deploy.cgroups import period_and_quota_us

CPU_CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")


def cgroup_unavailable_reason() -> str | None:
    """None if a CPU-quota cgroup can be made here, else why not (for skips and CLI errors)."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    if not (CPU_CGROUP_ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CPU_CGROUP_ROOT}"
    if not os.access(CPU_CGROUP_ROOT, os.W_OK):
        return f"{CPU_CGROUP_ROOT} is not writable"
    return None


@contextmanager
def cpu_quota_cgroup(cpu_fraction: float = 0.25) -> Iterator[Path]:
    """A cgroup ``d3-pred-test-<pid>`` limited to ``cpu_fraction`` of one CPU; removed afterwards."""
    reason = cgroup_unavailable_reason()
    if reason:
        raise OSError(f"cannot make a CPU-quota cgroup: {reason}")
    if not 0 < cpu_fraction <= 64:
        raise ValueError(f"cpu_fraction must be in (0, 64], got {cpu_fraction}")
    path = CPU_CGROUP_ROOT / f"d3-pred-test-{os.getpid()}"
    path.mkdir(exist_ok=True)
    try:
        period_us, quota_us = period_and_quota_us(cpu_fraction)
        (path / "cpu.cfs_period_us").write_text(str(period_us))
        (path / "cpu.cfs_quota_us").write_text(str(quota_us))
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            (CPU_CGROUP_ROOT / "cgroup.procs").write_text(pid)  # stragglers back to the root before rmdir
        path.rmdir()


def run_in_cgroup(cgroup: Path, argv: Sequence[str], timeout: float | None = None,
                  **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` as a child that joins ``cgroup`` (writes its own pid) before exec'ing the command."""
    script = f'echo $$ > {shlex.quote(str(cgroup / "cgroup.procs"))} && exec "$@"'
    return subprocess.run(["/bin/sh", "-c", script, "sh", *argv], timeout=timeout, **kwargs)

"""A real single-node Slurm cluster with accounting, started once per test session (tests/slurm/cluster.sh).

    from slurm_cluster import skip_marks, slurm_cluster  # noqa: F401 (fixture)

    pytestmark = [pytest.mark.slurm, *skip_marks()]

    def test_something(slurm_cluster): ...

While the fixture is up, SLURM_CONF in this process's environment points at the cluster, so sbatch, sacct,
scancel and submitit (which calls them) reach it, and so do the jobs, which inherit the environment.
The fixture skips, with one line saying why, where the cluster cannot start: not Linux, not root, the
Slurm/munge/MariaDB binaries missing (tests/slurm/install.sh installs them) or a failed start. With
SLURM_CLUSTER_REQUIRED=1 in the environment (CI) it fails instead of skipping.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parent / "slurm" / "cluster.sh"
# The programs that cluster.sh runs; the daemons live in /usr/sbin, which a non-login PATH may lack.
PROGRAMS = ("munged", "munge", "unmunge", "mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin",
            "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "sacctmgr", "sinfo", "squeue", "scancel",
            "scontrol", "setsid")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 180


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sacct, squeue, scancel, ...) against this cluster."""
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, check=check,
                              timeout=timeout)

    def log(self, name: str) -> str:
        """A daemon's log (slurmctld, slurmd, slurmdbd, munged, mysqld), for a failure message."""
        path = self.state_dir / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def unavailable_reason() -> str | None:
    """Why this machine cannot run the test cluster, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (its daemons run as root)"
    missing = [p for p in PROGRAMS if shutil.which(p, path=SEARCH_PATH) is None]
    if missing:
        return f"missing {', '.join(missing)} (tests/slurm/install.sh installs them)"
    return None


def skip_marks() -> list:
    """For a test module's pytestmark: where the cluster cannot run here, a skip mark, which pytest's summary
    folds into one line for the whole module (a skip raised by the fixture gets a line per test). None with
    SLURM_CLUSTER_REQUIRED=1: the fixture fails instead."""
    reason = unavailable_reason()
    if reason is None or os.environ.get("SLURM_CLUSTER_REQUIRED") == "1":
        return []
    return [pytest.mark.skip(reason=f"slurm test cluster: {reason}")]


def _skip_or_fail(reason: str) -> None:
    message = f"slurm test cluster: {reason}"
    if os.environ.get("SLURM_CLUSTER_REQUIRED") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _cluster(action: str, state_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": SEARCH_PATH}
    try:
        return subprocess.run(["bash", str(CLUSTER_SH), action, str(state_dir)], env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], 124, "", f"cluster.sh {action} took over {timeout:.0f}s")


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        _skip_or_fail(reason)
    state_dir = tmp_path_factory.mktemp("slurm-cluster")
    started = _cluster("start", state_dir, START_TIMEOUT_S)
    if started.returncode != 0:
        _cluster("stop", state_dir, STOP_TIMEOUT_S)  # whatever did start
        _skip_or_fail(f"start failed: {_last_line(started.stderr)}")
    cluster = SlurmCluster(state_dir)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        stopped = _cluster("stop", state_dir, STOP_TIMEOUT_S)
        if stopped.returncode != 0:
            raise RuntimeError(f"slurm test cluster: stop failed: {_last_line(stopped.stderr)}")

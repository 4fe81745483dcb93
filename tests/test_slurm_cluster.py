"""submitit against a real single-node Slurm cluster with accounting (tests/slurm_cluster.py).

A job array returns its results; more jobs than CPUs run at once; a Checkpointable job preempted mid-way
(SIGUSR2, as Slurm's --signal sends it) checkpoints, is requeued and finishes with the right result.
Deselect with `-m "not slurm"`.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import skip_marks, slurm_cluster  # noqa: F401 (fixture)

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")

pytestmark = [pytest.mark.slurm, *skip_marks()]

# The jobs unpickle these functions in a fresh interpreter that cannot import this test module (tests/ is
# not a package): pickle them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PARTITION = "debug"


def square_after(x: int, sleep_s: float) -> dict:
    start = time.time()
    time.sleep(sleep_s)
    return {"value": x * x, "start": start, "end": time.time(), "job": os.environ.get("SLURM_JOB_ID")}


class CountTo(submitit.helpers.Checkpointable):
    """Counts to n, one step every step_s seconds, appending each step to a progress file; a run that
    starts after a preemption resumes from the steps the file holds. Returns 1 + 2 + ... + n."""

    def __call__(self, progress: str, n: int, step_s: float) -> int:
        path = Path(progress)
        done = sum(line.startswith("step ") for line in path.read_text().splitlines()) if path.exists() else 0
        with path.open("a") as f:
            f.write(f"start {done} restart={os.environ.get('SLURM_RESTART_COUNT', '0')} at={time.time():.2f}\n")
        for i in range(done, n):
            time.sleep(step_s)
            with path.open("a") as f:
                f.write(f"step {i + 1} at={time.time():.2f}\n")
        return n * (n + 1) // 2


def executor(folder: Path, **params) -> "submitit.AutoExecutor":
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # timeout_min above 10: submitit reads a USR2 as a timeout, not a preemption, when timeout_min <= 10.
    ex.update_parameters(slurm_partition=PARTITION, timeout_min=30, cpus_per_task=1, **params)
    return ex


def wait_done(jobs, timeout_s: float) -> None:
    """job.result() can wait forever on a job that never ends: wait with a deadline, then show the logs."""
    deadline = time.monotonic() + timeout_s
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {job.job_id}\n{job.stdout()}\n{job.stderr()}" for job in jobs)
            pytest.fail(f"jobs not done after {timeout_s}s: {[job.state for job in jobs]}\n{logs}")
        time.sleep(0.5)


def sacct_states(cluster, job_id: str, expected: list[str], timeout_s: float = 30) -> list[str]:
    """Every run of the job (-D keeps the runs before a requeue), as sacct records it. The records reach the
    database a moment after the job ends (and after submitit sees its result): poll until they match."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = cluster.run("sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "JobID,State").stdout
        states = [line.split("|")[1] for line in out.splitlines() if line.strip()]
        if states == expected or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def test_job_array_returns_each_result(slurm_cluster, tmp_path):
    ex = executor(tmp_path / "submitit", slurm_array_parallelism=2)
    jobs = ex.map_array(square_after, [3, 4], [2.0, 2.0])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array: <array id>_<task>
    wait_done(jobs, timeout_s=120)
    results = [job.result() for job in jobs]
    assert [r["value"] for r in results] == [9, 16]
    assert max(r["start"] for r in results) < min(r["end"] for r in results), "the two tasks did not overlap"
    for job in jobs:
        assert sacct_states(slurm_cluster, job.job_id, ["COMPLETED"]) == ["COMPLETED"]
        # What submitit reads from sacct (job.state is cached: refreshed at most every few seconds).
        assert job.get_info(mode="force")["State"] == "COMPLETED"


def test_more_jobs_than_cpus_run_at_once(slurm_cluster, tmp_path):
    cpus = int(slurm_cluster.run("sinfo", "-h", "-o", "%c").stdout.split()[0])
    ex = executor(tmp_path / "submitit")
    with ex.batch():
        jobs = [ex.submit(square_after, i, 4.0) for i in range(cpus + 2)]
    wait_done(jobs, timeout_s=120)
    results = [job.result() for job in jobs]
    assert [r["value"] for r in results] == [i * i for i in range(cpus + 2)]
    assert max(r["start"] for r in results) < min(r["end"] for r in results), "not all jobs ran at once"


def test_preempted_checkpointable_job_is_requeued_and_finishes(slurm_cluster, tmp_path):
    folder = tmp_path / "submitit"
    progress = tmp_path / "progress.txt"
    n = 8
    ex = executor(folder)
    job = ex.submit(CountTo(), str(progress), n, 1.0)

    deadline = time.monotonic() + 90
    while not (progress.exists() and progress.read_text().count("step ") >= 3):
        assert time.monotonic() < deadline, f"job made no progress: {job.state}\n{job.stderr()}"
        time.sleep(0.2)
    # What Slurm's --signal sends before a time limit or a preemption: USR2 to the job's steps (submitit runs
    # the function in an srun step; --batch would signal the batch shell only, and kill it).
    slurm_cluster.run("scancel", "--signal=USR2", job.job_id)

    wait_done([job], timeout_s=150)
    assert job.result() == n * (n + 1) // 2

    lines = progress.read_text().splitlines()
    starts = [line for line in lines if line.startswith("start ")]
    assert len(starts) == 2, lines
    assert starts[0].startswith("start 0 restart=0")
    resumed_from = int(starts[1].split()[1])
    assert 3 <= resumed_from < n and "restart=1" in starts[1], lines
    steps = [int(line.split()[1]) for line in lines if line.startswith("step ")]
    assert steps == list(range(1, n + 1)), lines  # each step once: resumed, not restarted
    assert sacct_states(slurm_cluster, job.job_id, ["REQUEUED", "COMPLETED"]) == ["REQUEUED", "COMPLETED"]
    assert "this job is preempted" in (job.stdout() or "") + (job.stderr() or "")

"""Sweeps through submitit (`sweep --launcher slurm|local`), end to end on tiny experiments: one task per
experiment runs the `run` path; a task preempted mid-training (the signal Slurm sends before a time limit or
a preemption) writes its checkpoint, is requeued and finishes with the same metrics as an uninterrupted run;
a failing task is reported with its log and executed notebook while the others go on; `sweep --status`
shows the grid. The Slurm test runs on a real single-node cluster (tests/slurm_cluster.py)."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from instructblip_peft import cli, launch
from instructblip_peft.train import train

from slurm_cluster import skip_marks, slurm_cluster  # noqa: F401,F811 (fixture)
from train_fixtures import SINGLE_THREAD_ENV, TIMING_KEYS, make_colour_dataset

EXPERIMENTS = ["11", "27", "31"]   # LLM LoRA (and the whole Q-Former), Q-Former LoRA, both
# 32 optimizer steps per epoch, each logged: a preemption lands mid-training, between two checkpoints (written
# at epoch ends only): the stop writes its own.
SETTINGS = {"max_train_samples": 64, "batch_size": 2, "epochs": 2, "max_eval_samples": 8, "log_every_steps": 1}
TOTAL_STEPS = 64
FAST = ["--preset", "tiny"] + [x for k, v in SETTINGS.items() for x in ("-p", k, str(v))]
PREEMPT_AT_STEP = 3
DEADLINE_S = 600   # the whole sweep, on a busy machine


def outcome(run: Path) -> dict:
    """What an uninterrupted run and a preempted one must share: metrics (less timings), the training log, the
    fine-tuned weights."""
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "train_log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    weights = {f"{path.name}:{name}": hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
               for path in (run / "trained_tensors.safetensors", run / "adapter" / "adapter_model.safetensors")
               for name, tensor in load_file(path).items()}
    return {"metrics": {k: v for k, v in metrics.items() if k not in TIMING_KEYS}, "log": log, "weights": weights}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("processed"), n_train=64).parent


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """Each experiment trained straight through, in this process (train(), as the notebook calls it)."""
    cache = {}

    def get(exp: str) -> dict:
        if exp not in cache:
            out = tmp_path_factory.mktemp(f"uninterrupted-{exp}")
            train("scienceqa", exp, out, dataset_dir=data / "scienceqa", preset="tiny", progress=False, **SETTINGS)
            cache[exp] = outcome(out)
        return cache[exp]
    return get


@pytest.fixture
def task_env(monkeypatch):
    """The tasks inherit this environment: single-threaded like this process, so that their floating-point
    results are the same as the uninterrupted runs'."""
    for key, value in SINGLE_THREAD_ENV.items():
        monkeypatch.setenv(key, value)


def in_background(argv: list[str]):
    """cli.main(argv) in a thread (the sweep waits for its tasks while the test preempts one)."""
    box = {}

    def target():
        try:
            box["rc"] = cli.main(argv)
        except BaseException as e:  # reported by the test
            box["error"] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def task_record(run: Path) -> dict | None:
    try:
        jobs = json.loads((run / "run.json").read_text()).get("jobs") or []
    except (OSError, ValueError):
        return None
    return jobs[-1] if jobs else None


def steps_logged(run: Path) -> int:
    try:
        return len((run / "train_log.csv").read_text().splitlines()) - 1
    except OSError:
        return 0


def preempt_mid_training(run: Path, thread, send) -> None:
    """Once the run has logged PREEMPT_AT_STEP steps (mid-epoch), send its task the preemption signal."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and thread.is_alive():
        record = task_record(run)
        if steps_logged(run) >= PREEMPT_AT_STEP and record and record.get("state") == "running":
            send(record)
            return
        time.sleep(0.05)
    pytest.fail(f"{run.name} never reached step {PREEMPT_AT_STEP} while its sweep ran")


def join(thread, box, sweep_folder_of: Path) -> int:
    thread.join(DEADLINE_S)
    if thread.is_alive() or "error" in box:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sweep_folder_of.glob("jobs/*/*_log.out"))
        pytest.fail(f"sweep {'did not end' if thread.is_alive() else 'raised ' + repr(box.get('error'))}\n{logs}")
    return box["rc"]


def assert_preempted_and_resumed(run: Path) -> None:
    jobs = json.loads((run / "run.json").read_text())["jobs"]
    assert [j["restart"] for j in jobs] == [0, 1], jobs
    assert jobs[0]["job_id"] == jobs[1]["job_id"]                     # the same task, requeued
    assert jobs[0]["state"] == "requeued" and jobs[0]["stop"] == "the training wrote its checkpoint and stopped"
    assert jobs[1]["state"] == "finished"
    log = Path(jobs[0]["log"]).read_text()
    stopped = re.search(r"training stopped by SIGUSR2 at epoch \d, step (\d+)", log)
    assert stopped and PREEMPT_AT_STEP <= int(stopped.group(1)) < TOTAL_STEPS, log[-2000:]


def status_rows(capsys, outputs: Path, ids: str, seen: list | None = None) -> dict[str, str]:
    """`sweep --status` as rows: experiment -> "state progress job detail" (single spaces between columns).
    What else was printed meanwhile (the sweep in its thread) is added to `seen`."""
    assert cli.main(["sweep", "scienceqa", ids, "--status", "--outputs", str(outputs)]) == 0
    text = capsys.readouterr().out
    if seen is not None:
        seen.append(text)
    lines = text.splitlines()
    head = max(i for i, line in enumerate(lines) if re.match(r"scienceqa: \d+ runs: ", line))
    rows = {}
    for line in lines[head + 2:head + 2 + len(ids.split(","))]:
        exp, state, *rest = line.split(None, 2)
        rows[exp] = " ".join([state, *" ".join(rest).split()])
    return rows


def slurm_test(fn):
    for mark in (pytest.mark.slurm, *skip_marks()):
        fn = mark(fn)
    return fn


# ---------------------------------------------------------------- Slurm

@slurm_test
def test_slurm_array_with_a_preempted_task_ends_like_uninterrupted_runs(slurm_cluster, data, uninterrupted, task_env,
                                                                       tmp_path, capsys):
    import submitit

    submitit.slurm.slurm.SlurmJob.watcher.clear()   # job ids restart with each cluster
    outputs = tmp_path / "outputs"
    ids = ",".join(EXPERIMENTS)
    thread, box = in_background(
        ["sweep", "scienceqa", ids, "--launcher", "slurm", "--partition", "debug", "--gpus", "0", "--cpus", "1",
         "--mem-gb", "1", "--time-min", "30", *FAST, "--outputs", str(outputs), "--processed", str(data)])
    run = outputs / "scienceqa" / "31"
    preempt_mid_training(
        run, thread, lambda record: slurm_cluster.run("scancel", "--signal=USR2", record["job_id"]))
    seen = []
    during = status_rows(capsys, outputs, ids, seen)      # while the array runs: one row per experiment
    assert set(during) == set(EXPERIMENTS)
    assert all(r.split()[0] in ("running", "pending", "finished") for r in during.values()), during

    assert join(thread, box, outputs / "scienceqa") == 0
    out = "".join(seen) + capsys.readouterr().out
    assert re.search(r"submitted Slurm job array (\d+): 11 as \1_0, 27 as \1_1, 31 as \1_2", out), out
    assert "3 finished, 0 already finished, 0 failed" in out

    for exp in EXPERIMENTS:
        assert outcome(outputs / "scienceqa" / exp) == uninterrupted(exp), exp
        for notebook in ("02_train.ipynb", "03_results.ipynb"):
            assert (outputs / "scienceqa" / exp / notebook).is_file()
    assert_preempted_and_resumed(run)
    job_id = task_record(run)["job_id"]
    deadline = time.monotonic() + 60
    while (states := [line.split("|")[1] for line in slurm_cluster.run(
            "sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "JobID,State").stdout.splitlines()]) \
            != ["REQUEUED", "COMPLETED"] and time.monotonic() < deadline:
        time.sleep(0.5)   # sacct records a job's end a moment after it
    assert states == ["REQUEUED", "COMPLETED"]

    after = status_rows(capsys, outputs, ids)
    assert all(after[exp].startswith("finished val ") for exp in EXPERIMENTS), after
    assert job_id in after["31"]


@slurm_test
def test_slurm_refusing_the_array_is_one_line_and_leaves_nothing(slurm_cluster, data, tmp_path, capsys):
    outputs = tmp_path / "outputs"
    assert cli.main(["sweep", "scienceqa", "11", "--launcher", "slurm", "--partition", "nope", "--gpus", "0",
                     "--mem-gb", "1", *FAST, "--outputs", str(outputs), "--processed", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: Slurm refused the job array: sbatch: error: invalid partition specified: nope"
    assert not list((outputs / "scienceqa" / "jobs").iterdir())


# ---------------------------------------------------------------- this machine

@pytest.mark.slow  # tasks start notebook kernels: minutes of CPU (`make test-slow`)
def test_local_jobs_run_two_at_once_a_preempted_one_resumes_and_a_failed_one_is_reported(
        data, uninterrupted, task_env, tmp_path, capsys, monkeypatch):
    outputs = tmp_path / "outputs"
    # The zero-shot run cannot write its executed notebook (a directory is in the way): it fails at once.
    (outputs / "scienceqa" / "zeroshot-flant5xl" / "02_train.ipynb").mkdir(parents=True)
    ids = ",".join(["zeroshot-flant5xl", *EXPERIMENTS])
    thread, box = in_background(["sweep", "scienceqa", ids, "--launcher", "local", "--jobs", "2", *FAST,
                                 "--outputs", str(outputs), "--processed", str(data)])
    run = outputs / "scienceqa" / "27"
    preempt_mid_training(run, thread, lambda record: os.kill(record["pid"], signal.SIGUSR2))
    assert join(thread, box, outputs / "scienceqa") == 1
    out, err = capsys.readouterr()
    assert "3 finished, 0 already finished, 1 failed" in out

    # Never more than two at once; each task on the CPU (this machine has no GPU for it).
    running, most = set(), 0
    for exp, event in re.findall(r"scienceqa (\S+): (started|done|FAILED)", out):
        running = running | {exp} if event == "started" else running - {exp}
        most = max(most, len(running))
    assert most == 2, out
    failed = re.search(r"failed zeroshot-flant5xl: (.*)", err).group(1)
    assert "cannot write the executed notebook" in failed and "02_train.ipynb" in failed
    log = Path(re.search(r"task log: (\S+)\)", failed).group(1))
    assert log.is_file() and "cannot write the executed notebook" in log.read_text()

    for exp in EXPERIMENTS:
        assert outcome(outputs / "scienceqa" / exp) == uninterrupted(exp), exp
        assert "CUDA_VISIBLE_DEVICES=''" in Path(task_record(outputs / "scienceqa" / exp)["log"]).read_text()
    assert_preempted_and_resumed(run)

    rows = status_rows(capsys, outputs, ids)
    assert rows["zeroshot-flant5xl"].startswith("failed") and "cannot write the executed notebook" in \
        rows["zeroshot-flant5xl"] and str(log) in rows["zeroshot-flant5xl"]
    assert all(rows[exp].startswith("finished val ") for exp in EXPERIMENTS), rows

    # The same sweep again: the finished runs are skipped, only the failed one is launched.
    launched = []
    monkeypatch.setattr(launch, "_local", lambda plans, *args: launched.extend(p.experiment for p in plans))
    assert cli.main(["sweep", "scienceqa", ids, "--launcher", "local", *FAST, "--outputs", str(outputs),
                     "--processed", str(data)]) == 0
    assert launched == ["zeroshot-flant5xl"]
    assert capsys.readouterr().out.count("already finished, skipped") == 3


# ---------------------------------------------------------------- without tasks

@pytest.mark.parametrize("argv, message", [
    (["--jobs", "2"], "--jobs needs --launcher"),
    (["--partition", "gpu"], "--partition needs --launcher"),
    (["--launcher", "local", "--partition", "gpu"], "--partition is a Slurm setting"),
    (["--launcher", "slurm", "--jobs", "2"], "--jobs is for --launcher local"),
    (["--launcher", "local", "--no-wait"], "--no-wait is for --launcher slurm"),
    (["--launcher", "slurm", "--gpus", "2"], "--gpus must be 0 or 1"),
    (["--launcher", "slurm", "--cpus", "0"], "--cpus must be a positive integer, got 0"),
    (["--launcher", "local", "--jobs", "0"], "--jobs must be a positive integer, got 0"),
])
def test_launcher_mistakes_are_one_line(argv, message, capsys):
    assert cli.main(["sweep", "scienceqa", "1-4", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_each_local_task_gets_its_own_gpu():
    assert launch.local_slots(None, ["0", "1", "2"]) == ["0", "1", "2"]           # one per GPU by default
    assert launch.local_slots(2, ["3", "5"]) == ["3", "5"]                        # as CUDA_VISIBLE_DEVICES names them
    assert launch.local_slots(None, []) == [None] and launch.local_slots(3, []) == [None, None, None]  # CPU
    with pytest.raises(launch.UserError, match="--jobs 3: this machine has 2 GPU"):
        launch.local_slots(3, ["0", "1"])
    assert launch._slot_env("1", 2)["CUDA_VISIBLE_DEVICES"] == "1"
    assert launch._slot_env(None, 2)["CUDA_VISIBLE_DEVICES"] == ""


def test_status_reads_the_grid_from_the_run_directories(tmp_path, capsys):
    root = tmp_path / "scienceqa"
    (root / "27").mkdir(parents=True)
    (root / "27" / "metrics.json").write_text(json.dumps({"status": "finished", "val_accuracy": 0.5,
                                                          "test_accuracy": 0.25}))
    (root / "31" / "checkpoint").mkdir(parents=True)
    (root / "31" / "checkpoint" / "state.json").write_text(json.dumps({"epoch": 1, "global_step": 7}))
    (root / "31" / "run.json").write_text(json.dumps({"settings": {"epochs": 3}}))
    (root / "11").mkdir()
    (root / "11" / "run.json").write_text(json.dumps({"jobs": [
        {"launcher": "local", "job_id": "4000000", "restart": 0, "state": "failed", "error": "boom",
         "log": "/logs/4000000_0_log.out"}]}))
    sweep = root / "jobs" / "20240101-000000-local-1"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"launcher": "local", "submitted_at": 1, "tasks": {
        "11": {"job_id": "4000000", "log": "/logs/4000000_0_log.out"}}}))

    rows = status_rows(capsys, tmp_path, "11,27,31,28")
    assert rows["27"] == "finished val 0.500, test 0.250"
    assert rows["31"].startswith("stopped epoch 2/3, step 7") and "resumes it at epoch 2/3, step 7" in rows["31"]
    assert rows["11"].startswith("failed 4000000") and "boom (task log: /logs/4000000_0_log.out)" in rows["11"]
    assert rows["28"] == "pending not submitted"

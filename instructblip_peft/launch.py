"""Sweeps through submitit: one task per experiment, each running exactly the `run` path (runner.execute_run,
with its executed notebooks as the record).

- `--launcher slurm`: one SLURM job array (params/launch.yaml `slurm:`, or CLI flags);
- `--launcher local`: up to `--jobs` processes on this machine (submitit's LocalExecutor), each given its own
  GPU through CUDA_VISIBLE_DEVICES when the machine has GPUs;
- preemption and time limits: Slurm signals a task (USR2) before it stops it; submitit then calls
  RunTask.checkpoint, which has the training write its checkpoint and exit (stop.py), and requeues the same
  task, which runs the same `run` again: the run resumes from that checkpoint;
- `sweep ... --status`: one table of the grid, from the run directories (metrics, checkpoint, the task
  records in run.json), the sweeps' records (sweep.json) and the scheduler (squeue, sacct).

Each sweep gets a folder <outputs>/<dataset>/<jobs_subdir>/<sweep>/: the task logs, submitit's own files and
sweep.json, which task runs which experiment. Finished runs are skipped, partial ones resume, a failed task
is reported with its log and executed notebook while the others go on.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

from .artifacts import RunDir
from .config import load_yaml, outputs_root, run_dir
from .errors import UserError
from .experiments import parse_ids
from .io import read_json, write_json
from .runner import RunPlan, SweepResult, check_dataset, execute_run, is_done, plan_sweep
from .stop import STOP_SIGNALS_ENV, STOPPED_EXIT_STATUS, signal_names

LAUNCHERS = ("local", "slurm")
SWEEP_RECORD = "sweep.json"
# The local launcher has no time limit; submitit's LocalExecutor would stop a task after 2 minutes.
LOCAL_NO_TIME_LIMIT_MIN = 60 * 24 * 365

# ---------------------------------------------------------------- settings (params/launch.yaml)

# Kinds: text (a non-empty string), count (int >= 0), positive (int > 0), number (> 0), lines (list of
# strings), options (a mapping); a trailing ? allows null.
SETTINGS = {"jobs_subdir": "text", "poll_s": "number", "stop_grace_s": "number", "local": "options",
            "slurm": "options"}
LOCAL_SETTINGS = {"jobs": "positive?"}
SLURM_SETTINGS = {"partition": "text?", "gpus": "count", "cpus": "positive", "mem_gb": "number?",
                  "time_min": "positive", "account": "text?", "qos": "text?", "constraint": "text?",
                  "array_parallelism": "positive", "signal_delay_s": "positive", "time_limit_requeues": "count",
                  "job_name": "text", "setup": "lines", "additional": "options"}
# The CLI flags of `sweep` that override a slurm setting.
SLURM_FLAGS = {"partition": "--partition", "gpus": "--gpus", "cpus": "--cpus", "mem_gb": "--mem-gb",
               "time_min": "--time-min", "account": "--account", "qos": "--qos", "constraint": "--constraint"}


def _check(where: str, value, kind: str):
    nullable, kind = kind.endswith("?"), kind.rstrip("?")
    if value is None:
        if nullable:
            return None
        raise UserError(f"{where} cannot be null")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    integer = isinstance(value, int) and not isinstance(value, bool)
    ok, expected = {
        "text": (isinstance(value, str) and value.strip() != "", "a non-empty string"),
        "count": (integer and value >= 0, "an integer >= 0"),
        "positive": (integer and value > 0, "a positive integer"),
        "number": (number and value > 0, "a positive number"),
        "lines": (isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"),
        "options": (isinstance(value, dict), "a mapping"),
    }[kind]
    if not ok:
        raise UserError(f"{where} must be {expected}{' or null' if nullable else ''}, got {value!r}")
    return value


def _section(data: dict, schema: dict, where: str) -> dict:
    unknown = sorted(set(data) - set(schema))
    missing = sorted(set(schema) - set(data))
    if unknown:
        raise UserError(f"{where}: unknown setting '{unknown[0]}'. Valid settings: {', '.join(schema)}")
    if missing:
        raise UserError(f"{where}: missing setting '{missing[0]}'")
    return {key: _check(f"{where}: '{key}'", data[key], schema[key]) for key in schema}


def launch_settings(slurm_flags: dict | None = None, jobs: int | None = None) -> dict:
    """params/launch.yaml, checked, with the CLI's values (`--jobs`, SLURM_FLAGS) in place of its own."""
    where = "params/launch.yaml"
    settings = _section(load_yaml("launch.yaml"), SETTINGS, where)
    settings["local"] = _section(settings["local"], LOCAL_SETTINGS, f"{where} local")
    slurm = _section(settings["slurm"], SLURM_SETTINGS, f"{where} slurm")
    for key, value in (slurm_flags or {}).items():  # a flag given is never null
        if value is not None:
            slurm[key] = _check(SLURM_FLAGS[key], value, SLURM_SETTINGS[key].rstrip("?"))
    if jobs is not None:
        settings["local"]["jobs"] = _check("--jobs", jobs, LOCAL_SETTINGS["jobs"].rstrip("?"))
    if slurm["gpus"] > 1:
        flag = "--gpus" if (slurm_flags or {}).get("gpus") is not None else f"{where} slurm: 'gpus'"
        raise UserError(f"{flag} must be 0 or 1, got {slurm['gpus']}: a task trains one experiment in one process, "
                        "on one GPU")
    if settings["stop_grace_s"] >= slurm["signal_delay_s"]:
        raise UserError(f"{where}: stop_grace_s ({settings['stop_grace_s']}) must be shorter than slurm "
                        f"signal_delay_s ({slurm['signal_delay_s']}), or a task is killed before its checkpoint")
    settings["slurm"] = slurm
    return settings


def jobs_root(dataset: str, outputs_dir=None) -> Path:
    """<outputs>/<dataset>/<jobs_subdir>/: one folder per sweep."""
    return outputs_root(outputs_dir) / dataset / load_yaml("launch.yaml")["jobs_subdir"]


# ---------------------------------------------------------------- the task

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stop_signals() -> list[int]:
    """What a launched training treats as "checkpoint now and stop": the signal submitit listens to (Slurm's
    --signal before a time limit or a preemption, USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise), and
    SIGTERM, which Slurm sends to every process of a job it preempts or cancels."""
    usr = submitit.JobEnvironment._usr_sig()
    return [usr] + ([signal.SIGTERM] if usr != signal.SIGTERM else [])


class RunTask(Checkpointable):
    """One experiment of a sweep, as a submitit task: `instructblip-peft run`'s path in this process, each
    start recorded in the run's run.json. Preempted or at its time limit, checkpoint() stops the training
    with a checkpoint and returns the same task for submitit to requeue."""

    def __init__(self, stop_grace_s: float):
        self.stop_grace_s = stop_grace_s
        self._job: dict | None = None

    def __call__(self, spec: dict) -> str:
        os.environ.update(spec["env"])  # the GPU assigned to this task (local launcher), CPU threads
        os.environ[STOP_SIGNALS_ENV] = signal_names(stop_signals())  # inherited by the notebook kernels
        plan = _plan(spec)
        run = plan.run
        self._job = job = _job_entry(spec, run)
        run.record_job({**job, "state": "running"})
        print(f"{plan.dataset} {plan.experiment}: {run.path} (job {job['job_id']}, start {job['restart'] + 1}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})", flush=True)
        try:
            status = execute_run(plan, progress=False)
        except Exception as e:  # recorded for `sweep --status`, then raised: the scheduler sees a failed task
            message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            run.record_job({**job, "state": "failed", "error": message, "ended": _now()})
            raise
        run.record_job({**job, "state": status, "ended": _now()})
        print(f"{plan.dataset} {plan.experiment}: {status}", flush=True)
        return status

    def checkpoint(self, spec: dict) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's signal handler (in this process's main thread, which is waiting on the
        notebook): stop the training, record it, and hand back the same task to requeue."""
        how = stop_training(self.stop_grace_s)
        if self._job is not None:
            try:
                _plan(spec).run.record_job({**self._job, "state": "requeued", "stop": how, "ended": _now()})
            except UserError:
                pass  # a full disk must not keep the task from being requeued
        print(f"{spec['dataset']} {spec['experiment']}: stopped for a requeue: {how}", flush=True)
        return super().checkpoint(spec)


def stop_training(grace_s: float) -> str:
    """Ask the running notebook kernel (this process's child) to write its checkpoint and exit; kill it if it
    has not exited after grace_s. Returns what happened, for the record."""
    import psutil

    children = psutil.Process().children()
    if not children:
        return "no notebook was running"
    signum = stop_signals()[0]
    for child in children:
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    if alive:
        return f"the notebook did not stop within {grace_s:g} s and was killed: it resumes from its last checkpoint"
    if any(getattr(p, "returncode", None) == STOPPED_EXIT_STATUS for p in gone):
        return "the training wrote its checkpoint and stopped"
    return f"the notebook ended on {signal.Signals(signum).name} outside training: nothing to save"


def _plan(spec: dict) -> RunPlan:
    return RunPlan(spec["dataset"], spec["experiment"], spec["preset"], dict(spec["overrides"]),
                   Path(spec["outputs_dir"]), Path(spec["processed_dir"]))


def _job_entry(spec: dict, run: RunDir) -> dict:
    env = submitit.JobEnvironment()
    job_id = env.job_id
    restart = os.environ.get("SLURM_RESTART_COUNT")
    restart = int(restart) if restart and restart.isdigit() else \
        sum(1 for j in run.jobs() if j.get("job_id") == job_id)  # the local launcher restarts under the same id
    return {"launcher": spec["launcher"], "job_id": job_id, "restart": restart, "host": socket.gethostname(),
            "pid": os.getpid(), "log": str(env.paths.stdout), "sweep": spec["sweep"], "started": _now()}


# ---------------------------------------------------------------- launching a sweep

def launch_sweep(dataset: str, ids, launcher: str, preset: str | None = "auto", overrides: dict | None = None,
                 outputs_dir=None, processed_dir=None, shard: str | None = None, force: bool = False,
                 jobs: int | None = None, slurm: dict | None = None, wait: bool = True, log=print) -> SweepResult:
    """Run the sweep's unfinished experiments as submitit tasks (see the module's docstring). With wait
    (always for the local launcher), returns once every task has ended; else right after submitting."""
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher '{launcher}'. Valid launchers: {', '.join(LAUNCHERS)}")
    given = sorted(SLURM_FLAGS[k] for k, v in (slurm or {}).items() if v is not None)
    if launcher != "slurm" and given:
        raise UserError(f"{given[0]} is a Slurm setting: use it with --launcher slurm")
    if launcher != "local" and jobs is not None:
        raise UserError("--jobs is for --launcher local (Slurm runs up to slurm array_parallelism tasks at once)")
    if launcher == "local" and not wait:
        raise UserError("--no-wait is for --launcher slurm: the local launcher runs its tasks from this process")
    settings = launch_settings(slurm, jobs)
    plans = plan_sweep(dataset, ids, preset, overrides, outputs_dir, processed_dir, shard)
    result = SweepResult()
    todo = []
    for plan in plans:
        if force:  # here, once: a requeued task must resume, never start over
            if plan.directory.is_dir():
                with plan.run.lock():
                    plan.run.clear()
        elif is_done(plan):
            result.skipped.append(plan.experiment)
            log(f"{plan.dataset} {plan.experiment}: already finished, skipped ({plan.directory})")
            continue
        todo.append(plan)
    if not todo:
        return result
    sweep = Sweep.create(todo[0], launcher)
    task = RunTask(settings["stop_grace_s"])
    if launcher == "slurm":
        _slurm(todo, sweep, task, settings, wait, log, result)
    else:
        _local(todo, sweep, task, settings, log, result)
    return result


class Sweep:
    """A sweep's folder (submitit's files, task logs) and its record, sweep.json: which task runs which
    experiment, written whole after each submission."""

    def __init__(self, folder: Path, record: dict):
        self.folder, self.record = folder, record

    @classmethod
    def create(cls, plan: RunPlan, launcher: str) -> "Sweep":
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        folder = jobs_root(plan.dataset, plan.outputs_dir) / f"{stamp}-{launcher}-{os.getpid()}"
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot create the sweep's folder {folder}: {e.strerror or e}") from None
        return cls(folder, {"dataset": plan.dataset, "launcher": launcher, "submitted": _now(),
                            "submitted_at": time.time(), "tasks": {}})

    def spec(self, plan: RunPlan, env: dict | None = None) -> dict:
        return {"dataset": plan.dataset, "experiment": plan.experiment, "preset": plan.preset,
                "overrides": dict(plan.overrides), "outputs_dir": str(plan.outputs_dir),
                "processed_dir": str(plan.processed_dir), "launcher": self.record["launcher"],
                "sweep": self.folder.name, "env": dict(env or {})}

    def add(self, experiment: str, job) -> None:
        self.record["tasks"][experiment] = {"job_id": str(job.job_id), "log": str(job.paths.stdout)}
        write_json(self.folder / SWEEP_RECORD, self.record)


def _slurm(plans, sweep: Sweep, task: RunTask, settings: dict, wait: bool, log, result: SweepResult) -> None:
    s = settings["slurm"]
    try:
        ex = submitit.AutoExecutor(folder=sweep.folder, cluster="slurm",
                                   slurm_max_num_timeout=s["time_limit_requeues"])
    except RuntimeError:
        raise UserError("--launcher slurm: Slurm's srun is not on this machine's PATH; run the sweep on a "
                        "machine of the cluster (e.g. a login node)") from None
    params = dict(name=s["job_name"], timeout_min=s["time_min"], cpus_per_task=s["cpus"], stderr_to_stdout=True,
                  slurm_array_parallelism=s["array_parallelism"], slurm_signal_delay_s=s["signal_delay_s"])
    if s["gpus"]:
        params["gpus_per_node"] = s["gpus"]
    if s["mem_gb"] is not None:
        params["mem_gb"] = s["mem_gb"]
    for key in ("partition", "account", "qos", "constraint", "setup", "additional"):
        if s[key]:
            params[f"slurm_{'additional_parameters' if key == 'additional' else key}"] = s[key]
    try:
        ex.update_parameters(**params)
    except ValueError as e:
        raise UserError(f"params/launch.yaml slurm: {str(e).splitlines()[0]}") from None
    specs = [sweep.spec(plan) for plan in plans]
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # submitit prints sbatch's complaint; it goes into the one line
            jobs = ex.map_array(task, specs)
    except Exception as e:  # sbatch refused (unknown partition, account, ...): its first error
        shutil.rmtree(sweep.folder, ignore_errors=True)
        lines = [line.strip() for line in f"{said.getvalue()}\n{e}".splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        raise UserError(f"Slurm refused the job array: {(errors or lines or ['no reason given'])[0]}") from None
    for plan, job in zip(plans, jobs):
        sweep.add(plan.experiment, job)
    array_id = jobs[0].job_id.split("_")[0]
    log(f"submitted Slurm job array {array_id}: " + ", ".join(f"{p.experiment} as {j.job_id}"
                                                               for p, j in zip(plans, jobs)))
    log(f"task logs in {sweep.folder}; `instructblip-peft sweep {plans[0].dataset} "
        f"{','.join(p.experiment for p in plans)} --status` shows where they stand")
    if not wait:
        result.submitted.extend((p.experiment, j.job_id) for p, j in zip(plans, jobs))
        return
    _wait({p.experiment: (p, j, time.monotonic()) for p, j in zip(plans, jobs)}, settings["poll_s"], log, result,
          len(plans))
    log(f"Slurm job array {array_id}: every task has ended")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices, or the names it lists)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [x.strip() for x in listed.split(",") if x.strip()] if listed else [str(i) for i in range(count)]
    return names[:count]


def local_slots(jobs: int | None, gpus: list[str]) -> list[str | None]:
    """One slot per experiment that may run at once: a GPU each when there are GPUs, else None (CPU)."""
    if gpus:
        if jobs is not None and jobs > len(gpus):
            raise UserError(f"--jobs {jobs}: this machine has {len(gpus)} GPU(s) ({','.join(gpus)}) and each "
                            "experiment gets one")
        return list(gpus[:jobs or len(gpus)])
    return [None] * (jobs or 1)


def _slot_env(slot: str | None, slots: int) -> dict:
    env = {"CUDA_VISIBLE_DEVICES": slot or ""}
    if slot is None and "OMP_NUM_THREADS" not in os.environ:  # CPU processes share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // slots))
    return env


def _local(plans, sweep: Sweep, task: RunTask, settings: dict, log, result: SweepResult) -> None:
    slots = local_slots(settings["local"]["jobs"], visible_gpus())
    ex = submitit.LocalExecutor(folder=sweep.folder)
    ex.update_parameters(timeout_min=LOCAL_NO_TIME_LIMIT_MIN, stderr_to_stdout=True)
    where = f"GPUs {','.join(slots)}" if slots[0] is not None else "CPU"
    log(f"running {len(plans)} experiment(s), up to {len(slots)} at once ({where}); task logs in {sweep.folder}")
    queue, free = list(plans), list(slots)
    running: dict = {}   # experiment -> (plan, job, start, slot)
    total = len(plans)
    try:
        while queue or running:
            while queue and free:
                plan, slot = queue.pop(0), free.pop(0)
                job = ex.submit(task, sweep.spec(plan, _slot_env(slot, len(slots))))
                sweep.add(plan.experiment, job)
                running[plan.experiment] = (plan, job, time.monotonic(), slot)
                log(f"{plan.dataset} {plan.experiment}: started (job {job.job_id}"
                    f"{f', GPU {slot}' if slot is not None else ''}): {plan.directory}")
            for exp, (plan, job, start, slot) in list(running.items()):
                if job.done():
                    del running[exp]
                    free.append(slot)
                    _report(plan, job, start, log, result, total)
            if running:
                time.sleep(settings["poll_s"])
    except KeyboardInterrupt:
        for plan, job, _, _ in running.values():
            job.cancel(check=False)
        log(f"interrupted: {len(running)} running experiment(s) stopped; they resume from their last checkpoint")
        raise


def _wait(pending: dict, poll_s: float, log, result: SweepResult, total: int) -> None:
    try:
        while pending:
            for exp, (plan, job, start) in list(pending.items()):
                if job.done():
                    del pending[exp]
                    _report(plan, job, start, log, result, total)
            if pending:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        log(f"stopped waiting: {len(pending)} task(s) keep running on the cluster; `sweep ... --status` shows them")
        raise


def _report(plan: RunPlan, job, start: float, log, result: SweepResult, total: int) -> None:
    n = len(result.finished) + len(result.failed) + 1
    where = f"[{n}/{total}] {plan.dataset} {plan.experiment}"
    if plan.run.is_finished():
        result.finished.append(plan.experiment)
        log(f"{where}: done (job {job.job_id}, {time.monotonic() - start:.0f} s)")
        return
    message = failure_reason(plan.run, str(job.job_id), _job_state(job), str(job.paths.stdout))
    result.failed.append((plan.experiment, message))
    log(f"{where}: FAILED: {message}")


def _job_state(job) -> str:
    """The scheduler's last word on an ended job (Slurm: sacct's State; local: FINISHED or INTERRUPTED)."""
    try:
        info = job.get_info(mode="force")
    except Exception:  # the scheduler did not answer
        return "UNKNOWN"
    return str(info.get("State") or info.get("jobState") or "UNKNOWN").split()[0]


def failure_reason(run: RunDir, job_id: str, state: str | None, log: str) -> str:
    """Why a task did not finish its run: the error it recorded, or else the scheduler's word; its log."""
    record = next((j for j in reversed(run.jobs()) if j.get("job_id") == job_id), None)
    if record is not None and record.get("error"):
        reason = record["error"]
    elif state:
        reason = f"job {job_id} ended ({state}) before the run finished"
    else:
        reason = f"job {job_id} ended before the run finished"
    notebook = run.notebook("train")
    if "executed notebook" not in reason and notebook.is_file():
        reason += f" (executed notebook: {notebook})"
    return f"{reason} (task log: {(record or {}).get('log') or log})"


# ---------------------------------------------------------------- sweep --status

ACTIVE_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD",
                 "SPECIAL_EXIT"}
ENDED_BADLY = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
               "PREEMPTED", "REVOKED"}
STATES = ("pending", "running", "stopped", "failed", "finished")


def latest_submissions(dataset: str, outputs_dir=None) -> dict[str, dict]:
    """experiment -> its latest sweep task {launcher, job_id, log, sweep}, from the sweeps' sweep.json."""
    root = jobs_root(dataset, outputs_dir)
    records = []
    for path in root.glob(f"*/{SWEEP_RECORD}") if root.is_dir() else []:
        try:
            records.append(read_json(path))
        except UserError:
            continue  # an unreadable record only hides that sweep's queued tasks
    latest = {}
    for record in sorted(records, key=lambda r: r.get("submitted_at") or 0):
        for exp, task in (record.get("tasks") or {}).items():
            latest[exp] = {**task, "launcher": record.get("launcher")}
    return latest


def _command(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """Each job's state: squeue for queued and running jobs (array tasks one by one), sacct for ended ones.
    None where Slurm's commands are not installed."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    states: dict[str, str] = {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    out = _command(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)])
    for line in (out or "").splitlines():
        job, _, state = line.strip().partition("|")
        if job in job_ids:
            states[job] = state.strip()
    rest = [j for j in job_ids if j not in states]
    if rest and shutil.which("sacct") is not None:
        out = _command(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(rest)])
        for line in (out or "").splitlines():
            job, _, state = line.strip().partition("|")
            if job in rest and state:
                states[job] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def _local_alive(job_id: str) -> bool:
    """The local launcher's job (its controller process, whose pid is the job id) still runs."""
    import psutil

    try:
        return any("submitit" in part for part in psutil.Process(int(job_id)).cmdline())
    except (ValueError, psutil.Error):
        return False


def _where(run: RunDir) -> str:
    progress = run.progress()
    if progress is None:
        return ""
    try:
        epochs = run.run_info().get("settings", {}).get("epochs")
    except UserError:
        epochs = None
    epoch, step = int(progress.get("epoch", 0)), progress.get("global_step", 0)
    if progress.get("stopped") or (epochs and epoch >= epochs):
        return f"trained ({step} steps), testing"
    return f"epoch {epoch + 1}{f'/{epochs}' if epochs else ''}, step {step}"


def sweep_status(dataset: str, ids, outputs_dir=None) -> list[dict]:
    """One row per experiment: state (STATES), progress, job and detail, from the run directories, the
    sweeps' records and the scheduler."""
    check_dataset(dataset)
    id_list = parse_ids(ids) if isinstance(ids, str) else list(ids)
    submitted = latest_submissions(dataset, outputs_dir)
    slurm_jobs = [t["job_id"] for e, t in submitted.items() if e in id_list and t.get("launcher") == "slurm"]
    scheduler = slurm_states(slurm_jobs)
    rows = []
    for exp in id_list:
        run = RunDir(run_dir(dataset, exp, outputs_dir))
        task = submitted.get(exp)
        rows.append(_status_row(exp, run, task, scheduler))
    return rows


def _status_row(exp: str, run: RunDir, task: dict | None, scheduler: dict | None) -> dict:
    row = {"experiment": exp, "state": "pending", "progress": "", "job": "", "detail": "", "run_dir": str(run.path)}
    try:
        metrics = run.metrics() if run.is_finished() else None
    except UserError:
        metrics = None
    records = run.jobs()
    if task is None and records:  # started without a sweep record (e.g. the sweep's folder was deleted)
        task = {"job_id": records[-1].get("job_id"), "launcher": records[-1].get("launcher"),
                "log": records[-1].get("log")}
    job_id = str(task["job_id"]) if task else ""
    row["job"] = job_id
    if metrics is not None:
        row.update(state="finished", progress=f"val {metrics['val_accuracy']:.3f}, test {metrics['test_accuracy']:.3f}")
        return row
    record = next((j for j in reversed(records) if str(j.get("job_id")) == job_id), None) if job_id else None
    log = (record or {}).get("log") or (task or {}).get("log") or ""
    where = _where(run)
    if task is None:
        state = None
    elif task.get("launcher") == "slurm":
        state = None if scheduler is None else scheduler.get(job_id)
    else:
        state = "RUNNING" if _local_alive(job_id) else None
    if run.is_locked() or state in ACTIVE_STATES:
        row.update(state="running", progress=where or "starting", detail=f"log: {log}" if log else "")
    elif state in QUEUED_STATES:
        requeued = bool(record) or state != "PENDING"
        row.update(state="pending", progress=where, detail=("requeued" if requeued else "queued") +
                   (f", resumes at {where}" if where else ""))
    elif record is not None and record.get("state") == "failed":
        row.update(state="failed", progress=where, detail=failure_reason(run, job_id, state, log))
    elif state in ENDED_BADLY or (state == "COMPLETED" and task is not None):
        row.update(state="failed", progress=where, detail=failure_reason(run, job_id, state, log))
    elif where or records:
        row.update(state="stopped", progress=where, detail="no task is running it: the next sweep (or `run`) "
                                                           "resumes it" + (f" at {where}" if where else ""))
    else:
        row.update(detail="not started" if task else "not submitted")
    if task is not None and task.get("launcher") == "slurm" and scheduler is None and row["state"] != "finished":
        row["detail"] = (row["detail"] + "; " if row["detail"] else "") + "Slurm's squeue is not on this machine"
    return row


def format_status(dataset: str, rows: list[dict]) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    head = f"{dataset}: {len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    width = max([len("ID")] + [len(r["experiment"]) for r in rows])
    pwidth = max([len("progress")] + [len(r["progress"]) for r in rows])
    jwidth = max([len("job")] + [len(r["job"]) for r in rows])
    lines = [head, f"{'ID':>{width}}  {'state':9} {'progress':{pwidth}}  {'job':{jwidth}}  detail"]
    for r in rows:
        lines.append(f"{r['experiment']:>{width}}  {r['state']:9} {r['progress']:{pwidth}}  {r['job']:{jwidth}}  "
                     f"{r['detail']}".rstrip())
    return "\n".join(lines)

"""Executing the notebooks with papermill: the executed notebook is the record of a step.

execute_preprocess -> 01 into <processed>/<dataset>/; execute_run -> 02 and 03 into <outputs>/<dataset>/<id>/;
sweep -> many runs; analyze -> 04 into <outputs>/analysis/. Everything is validated before a notebook starts,
and the settings overrides travel into the notebooks as one `overrides` dict.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import RunDir
from .config import (PARAMS_ENV, WORKDIR_ENV, analysis_dir, demo_processed_root, demo_root, load_yaml,
                     notebooks_dir, outputs_root, params_dir, preset_for, processed_root, resolve_settings, run_dir,
                     validate_overrides, work_dir)
from .data.records import DATASETS, MANIFEST
from .errors import UserError
from .data.preprocess import HUB_PREFIX, check_raw
from .experiments import check_method, get_experiment, parse_ids, representative_id, run_name
from .tracking import ProgressTail, check_tracker

NOTEBOOK_DIR: Path | None = None   # None: config.notebooks_dir() (a project folder, the clone or the installed copy)
LIVE_NOTEBOOKS = ("train",)        # notebooks whose progress the terminal shows while they run (tracking.py)


def notebook_dir() -> Path:
    return NOTEBOOK_DIR or notebooks_dir()


def runner_settings() -> dict:
    return load_yaml("runner.yaml")


def check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}'. Valid datasets: {', '.join(DATASETS)}")
    return dataset


# ---------------------------------------------------------------- executing one notebook

class NotebookFailed(UserError):
    """A notebook stopped with an error; says which notebook and cell, and where the executed copy is."""

    def __init__(self, notebook: str, output: Path, cell: int | None, ename: str, evalue: str):
        self.notebook, self.output, self.cell, self.ename, self.evalue = notebook, output, cell, ename, evalue
        where = f" at cell {cell}" if cell is not None else ""
        # A UserError raised inside the notebook already is one clear line: show it as is.
        what = evalue if ename == "UserError" else f"{ename}: {evalue}"
        super().__init__(f"{notebook} failed{where}: {what.strip().splitlines()[-1] if what.strip() else ename}"
                         f" (executed notebook: {output})")


def execute(notebook_key: str, output: Path, parameters: dict, progress: bool = True) -> Path:
    """Run notebooks/<notebook> with `parameters` into `output` (kept also when it fails)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    settings = runner_settings()
    name = settings["notebooks"][notebook_key]
    source = notebook_dir() / name
    if not source.is_file():
        raise UserError(f"notebook {source} not found")
    live = progress and process_rank() == 0 and notebook_key in LIVE_NOTEBOOKS
    # The kernel uses the params/ and the work directory resolved here, whichever folder it starts in.
    kernel_env = {PARAMS_ENV: str(params_dir()), WORKDIR_ENV: str(work_dir())}
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        Path(kernel_env[WORKDIR_ENV]).mkdir(parents=True, exist_ok=True)
        with _environ(kernel_env), ProgressTail() if live else contextlib.nullcontext():
            pm.execute_notebook(str(source), str(output), parameters=parameters, kernel_name=settings["kernel_name"],
                                cwd=kernel_env[WORKDIR_ENV], log_output=False,
                                progress_bar=progress and not live and _interactive(),
                                # The kernel's start-up warnings (plain-TCP transport on localhost) are noise here.
                                extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except PapermillExecutionError as e:
        raise NotebookFailed(name, output, _cell_number(output, e.exec_count), e.ename, e.evalue) from None
    except OSError as e:  # the executed notebook cannot be written (a directory in its place, no space, ...)
        raise UserError(f"{name}: cannot write the executed notebook {output}: {e.strerror or e}") from None
    except Exception as e:  # kernel missing, kernel died, ... (papermill/jupyter_client errors)
        if "No such kernel" in str(e) or type(e).__name__ == "NoSuchKernel":
            raise UserError(f"jupyter kernel '{settings['kernel_name']}' is not installed: run "
                            f"`python -m ipykernel install --sys-prefix --name {settings['kernel_name']}`") from None
        if type(e).__module__.split(".")[0] in ("papermill", "nbclient", "jupyter_client"):
            raise NotebookFailed(name, output, None, type(e).__name__, str(e)) from None
        raise
    return output


@contextlib.contextmanager
def _environ(values: dict):
    """Set environment variables for the kernels started inside the block (they inherit them), then restore."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _interactive() -> bool:
    return sys.stderr.isatty() and process_rank() == 0


def process_rank() -> int:
    """This process's rank under `accelerate launch`/torchrun (0 otherwise). The notebook kernels
    inherit the launcher's environment, so train() inside them joins the process group."""
    return int(os.environ.get("RANK", "0") or 0)


def _cell_number(output: Path, exec_count) -> int | None:
    """The failing cell's position among code cells (1-based, as JupyterLab shows them), from the
    executed notebook papermill wrote."""
    try:
        cells = [c for c in json.loads(output.read_text())["cells"] if c["cell_type"] == "code"]
    except (OSError, ValueError, KeyError):
        return None
    for i, c in enumerate(cells, 1):
        if any(o.get("output_type") == "error" for o in c.get("outputs", [])):
            return i
    return exec_count


# ---------------------------------------------------------------- steps

PREPROCESS_SETTINGS = ("keep_text_only", "skip_invalid")


def execute_preprocess(dataset: str, raw_dir: str | Path | None = None, processed_dir: str | Path | None = None,
                       overrides: dict | None = None, progress: bool = True) -> Path:
    """01_preprocess into <processed>/<dataset>/01_preprocess.ipynb; raw None: the bundled sample."""
    check_dataset(dataset)
    raw = str(raw_dir or "")
    if not raw and dataset == "custom":
        raise UserError("custom data has no bundled sample: pass --raw DIR, a directory with train.jsonl, "
                        "val.jsonl and test.jsonl (format: instructblip_peft/data/custom.py)")
    if raw.startswith(HUB_PREFIX):
        if dataset != "scienceqa":
            raise UserError(f"--raw {raw}: hub datasets are supported for scienceqa only")
    elif raw:
        raw = str(Path(raw).expanduser().resolve())
        if not Path(raw).is_dir():
            raise UserError(f"raw data directory {raw} not found")
        check_raw(dataset, Path(raw))  # the expected files are there: the notebook starts only then
    settings = validate_overrides(overrides)
    other = sorted(set(settings) - set(PREPROCESS_SETTINGS))
    if other:
        raise UserError(f"preprocess takes only {', '.join(PREPROCESS_SETTINGS)} as -p settings, not "
                        f"{', '.join(other)}")
    out = processed_root(processed_dir) / dataset / runner_settings()["notebooks"]["preprocess"]
    return execute("preprocess", out, {"dataset": dataset, "raw_dir": raw,
                                       "processed_dir": str(processed_root(processed_dir)), **settings}, progress)


@dataclass
class RunPlan:
    dataset: str
    experiment: str
    preset: str
    overrides: dict = field(default_factory=dict)
    outputs_dir: Path | None = None
    processed_dir: Path | None = None
    name: str = ""   # the run directory's name: the ID, plus e.g. "+dora" for another method (experiments.run_name)

    @property
    def directory(self) -> Path:
        return run_dir(self.dataset, self.name or self.experiment, self.outputs_dir)

    @property
    def run(self) -> RunDir:
        return RunDir(self.directory)


def plan_run(dataset: str, experiment: str, preset: str | None = "auto", overrides: dict | None = None,
             outputs_dir=None, processed_dir=None) -> RunPlan:
    """Check everything a run needs before any notebook starts (unknown dataset/ID/preset/setting,
    missing processed data) and return what to execute. The overrides are validated here, as train()
    resolves them, and travel on typed."""
    import torch  # only to know whether this machine has a GPU (what "auto" precision means here)

    from .model import resolve_precision
    check_dataset(dataset)
    exp = get_experiment(experiment)
    preset_dict = preset_for(exp, preset)  # a preset of the wrong family is an error now, not 30 s into a kernel
    overrides = validate_overrides(overrides)
    settings = resolve_settings(dataset, exp, preset_dict, overrides)  # what train() sees: fails here, not in a kernel
    check_method(exp, settings)
    check_tracker(settings.report_to)
    resolve_precision(settings.mixed_precision, settings.model_dtype, "cuda" if torch.cuda.is_available() else "cpu")
    processed = processed_root(processed_dir)
    if not (processed / dataset / MANIFEST).is_file():
        raise UserError(f"no processed {dataset} data in {processed / dataset}: run "
                        f"`instructblip-peft preprocess {dataset}` first")
    return RunPlan(dataset, exp.id, preset or "auto", overrides, outputs_root(outputs_dir), processed,
                   run_name(exp.id, settings))


def is_done(plan: RunPlan) -> bool:
    """The run is finished, by the plan's preset, with both executed notebooks: `run` skips it. A finished
    run of another preset is an error (check_identity)."""

    run = plan.run
    if not run.is_finished():
        return False
    run.check_identity(preset=preset_for(get_experiment(plan.experiment), plan.preset)["name"])
    return all(run.notebook(k).is_file() for k in ("train", "results"))


def execute_run(plan: RunPlan, force: bool = False, progress: bool = True) -> str:
    """02_train then 03_results into the run directory. Returns "finished" or "skipped" (already
    finished: nothing is executed). An unfinished run resumes from its checkpoint (train() does that)."""
    run = plan.run
    if not force and is_done(plan):
        return "skipped"
    where = {"dataset": plan.dataset, "outputs_dir": str(plan.outputs_dir), "processed_dir": str(plan.processed_dir)}
    rank = process_rank()
    # Under a multi-process launch every rank runs the training notebook; only rank 0's copy is the record.
    train_record = run.notebook("train")
    if rank != 0:
        train_record = run.path / f".rank{rank}" / train_record.name
    # `overrides` replaces the notebook's default dict whole (its small interactive limits included).
    execute("train", train_record, {**where, "experiment": plan.experiment, "preset": plan.preset,
                                    "force": bool(force), "overrides": dict(plan.overrides)}, progress)
    if rank == 0:
        execute("results", run.notebook("results"), {**where, "run_name": run.path.name}, progress)
    return "finished"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'K/N' (1-based: 1/4 is the first of four shards) -> (K, N)."""
    if not text:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"bad --shard '{text}': expected K/N, e.g. 1/4 for the first of four shards") from None
    if not (n >= 1 and 1 <= k <= n):
        raise UserError(f"bad --shard '{text}': K must be between 1 and N (1-based)")
    return k, n


def shard_ids(ids: list[str], shard: tuple[int, int] | None) -> list[str]:
    if shard is None:
        return ids
    k, n = shard
    return ids[k - 1::n]


def plan_sweep(dataset: str, ids: str | list[str], preset: str | None = "auto", overrides: dict | None = None,
               outputs_dir=None, processed_dir=None, shard: str | None = None) -> list[RunPlan]:
    """Every run of a sweep, checked before any starts (plan_run)."""
    id_list = parse_ids(ids) if isinstance(ids, str) else list(ids)
    # A rankless method (IA3) makes a group's ranks one run: each is run once, under the group's first ID.
    method = resolve_settings(overrides=validate_overrides(overrides))
    id_list = list(dict.fromkeys(representative_id(get_experiment(i), method) for i in id_list))
    id_list = shard_ids(id_list, parse_shard(shard))
    return [plan_run(dataset, i, preset, overrides, outputs_dir, processed_dir) for i in id_list]


@dataclass
class SweepResult:
    finished: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)   # (id, message)
    submitted: list = field(default_factory=list)  # (id, job id): left running on a scheduler (launch.py)


def sweep(dataset: str, ids: str | list[str], preset: str | None = "auto", overrides: dict | None = None,
          outputs_dir=None, processed_dir=None, shard: str | None = None, force: bool = False,
          progress: bool = True, log=print) -> SweepResult:
    """Run many experiments, one after another in this process; finished ones are skipped, a partial one
    resumes, a failing one is reported and the sweep goes on. (launch.py runs them as SLURM array tasks
    or as several processes on this machine.)"""
    plans = plan_sweep(dataset, ids, preset, overrides, outputs_dir, processed_dir, shard)
    result = SweepResult()
    for n, plan in enumerate(plans, 1):
        start = time.monotonic()
        log(f"[{n}/{len(plans)}] {plan.dataset} {plan.experiment}: {plan.directory}")
        try:
            status = execute_run(plan, force=force, progress=progress)
        except UserError as e:
            result.failed.append((plan.experiment, str(e)))
            log(f"[{n}/{len(plans)}] {plan.dataset} {plan.experiment}: FAILED: {e}")
            continue
        (result.finished if status == "finished" else result.skipped).append(plan.experiment)
        what = "done" if status == "finished" else "already finished, skipped"
        log(f"[{n}/{len(plans)}] {plan.dataset} {plan.experiment}: {what} ({time.monotonic() - start:.0f} s)")
    return result


def analyze(outputs_dir=None, progress: bool = True) -> Path:
    """04_analysis over every run under outputs_dir; returns the analysis directory."""
    from .artifacts import run_dirs

    root = outputs_root(outputs_dir)
    if not run_dirs(root):
        raise UserError(f"no runs to analyze in {root} (expected <dataset>/<experiment id>/ directories): run "
                        "`instructblip-peft run` or `sweep` first, or pass --outputs")
    out = analysis_dir(outputs_dir)
    execute("analysis", out / runner_settings()["notebooks"]["analysis"], {"outputs_dir": str(root)}, progress)
    return out


# ---------------------------------------------------------------- the demo

@dataclass
class DemoResult:
    outputs_dir: Path                            # <outputs>/demo/: its runs
    analysis_dir: Path
    failed: list = field(default_factory=list)   # (dataset, id, message)


def run_demo(outputs_dir=None, datasets: list[str] | None = None, experiments: list | None = None,
             overrides: dict | None = None, log=print) -> DemoResult:
    """`instructblip-peft demo`: the bundled sample preprocessed, every run of params/runner.yaml's `demo:`
    with the tiny preset, and the analysis, all under <outputs>/demo/. `datasets`, `experiments` and
    `overrides` (over the demo's `overrides` and `dataset_overrides`) narrow it down. Runs are forced: the
    demo always shows what the current code and sample give. `parallel_runs` notebooks execute at once; a
    failed run is reported and the others go on."""
    from .data.sample import ensure_sample

    demo = runner_settings()["demo"]
    root, processed = demo_root(outputs_dir), demo_processed_root(outputs_dir)
    datasets = [check_dataset(d) for d in (datasets or demo["datasets"])]
    ids = [get_experiment(str(i)).id for i in (experiments or demo["experiments"])]
    settings = {d: validate_overrides({**(demo.get("overrides") or {}),
                                       **((demo.get("dataset_overrides") or {}).get(d) or {}), **(overrides or {})})
                for d in datasets}
    workers = max(1, int(demo.get("parallel_runs") or 1))
    progress = workers == 1  # progress bars of notebooks running side by side would garble each other
    sample = ensure_sample()  # generated here, once: two preprocessing notebooks at once must not both write it
    with _threads_per_kernel(workers):
        for dataset in datasets:
            log(f"preprocess {dataset} (bundled sample) into {processed / dataset}")
        # Every dataset preprocessed before any run starts; a failure here stops the demo.
        # The sample's folders explicitly: without raw_dir, preprocess would take a finished real download.
        in_parallel(lambda d: execute_preprocess(d, sample / d, processed_dir=processed, progress=progress),
                    datasets, workers)
        plans = [plan_run(d, i, demo["preset"], settings[d], root, processed) for d in datasets for i in ids]
        # Trained runs first, zero-shot (evaluation only, short) last: the workers then finish together.
        plans.sort(key=lambda p: not get_experiment(p.experiment).train)
        log(f"run {', '.join(datasets)}: {', '.join(ids)} with the {demo['preset']} preset, {workers} at a time")

        def one(numbered):
            n, plan = numbered
            name = f"[{n}/{len(plans)}] {plan.dataset} {plan.experiment}"
            start = time.monotonic()
            log(f"{name}: {plan.directory}")
            try:
                execute_run(plan, force=True, progress=progress)
            except UserError as e:
                log(f"{name}: FAILED: {e}")
                return plan.dataset, plan.experiment, str(e)
            log(f"{name}: done ({time.monotonic() - start:.0f} s)")
            return None

        failed = [f for f in in_parallel(one, list(enumerate(plans, 1)), workers) if f]
    log("analysis")
    return DemoResult(root, analyze(root, progress=progress), failed)


def in_parallel(fn, items: list, workers: int) -> list:
    """[fn(item) for item in items], `workers` at a time (threads: each waits on its notebook's kernel).
    The first exception stops the taking of new items and is raised once the running ones end. The threads
    are daemons, so Ctrl-C ends the process at once, as it would one notebook (the kernels exit with it)."""
    results, errors = [None] * len(items), []
    todo = queue.SimpleQueue()
    for i in range(len(items)):
        todo.put(i)

    def work():
        while not errors:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(e)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)  # short waits keep the main thread responsive to Ctrl-C
    if errors:
        raise errors[0]
    return results


@contextlib.contextmanager
def _threads_per_kernel(parallel: int):
    """With `parallel` notebooks at once, each kernel computes on its share of the cores (OMP_NUM_THREADS,
    which the kernels inherit): more threads than cores make them wait on each other. A value the user set
    is kept."""
    if parallel <= 1 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // parallel))
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)

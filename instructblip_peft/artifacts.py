"""A run's output directory, `<outputs>/<dataset>/<experiment id>/`: the one place that knows its layout.

- `run.json`: dataset, experiment, preset, model seed/source and the settings, enough to rebuild the model;
  under `jobs`, the sweep tasks (launch.py) that ran it, one entry per start: a requeued task appears again;
- `checkpoint/`, `best/`: resume state and the best-val trainable tensors (checkpoint.py writes them;
  `checkpoint/state.json` says where training stands);
- `train_log.csv`: the loss every `log_every_steps` optimizer steps; `tensorboard/`: the same curves and the
  val accuracy per epoch as TensorBoard event files (report_to: tensorboard, tracking.py);
- `adapter/`: the LoRA weights in peft's format; `trained_tensors.safetensors`: every other trained tensor
  (finetuned.py writes and reads both);
- `predictions_{val,test}.jsonl`, then `metrics.json` last: its status "finished" marks a complete run;
- AdaLoRA runs: `adalora_ranks.json`, every adapted module's final rank and importance, and its figure;
- the executed notebooks (names from params/runner.yaml) and `run.lock`;
- while a run evaluates, `eval_vision_cache.<process>.bin`: the part of its evaluation vision cache beyond
  `eval_vision_cache_ram_gb`, memory-mapped, one per process; deleted at the end of the run;
- while a run trains (`train_vision_cache`, images not augmented), `train_vision_cache.<process>.bin`: the
  same for the training images' ViT outputs beyond `train_vision_cache_ram_gb`; deleted at the end of the
  run, and a killed run's file is never read: every session starts that cache empty.

An exported folder (`instructblip-peft export`) is laid out the same way, without checkpoints, predictions
and notebooks, plus its model card `README.md`; `--merged` puts a plain transformers checkpoint in place of
the adapter and trained tensors.

Light on purpose (no torch): the runner, the analysis and the notebooks ask it questions about runs.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .config import demo_processed_root, demo_root, load_yaml, outputs_root, processed_root
from .errors import UserError
from .io import complete_dir, read_json, remove_dir, write_json

METRICS = "metrics.json"
RUN_INFO = "run.json"
TRAIN_LOG = "train_log.csv"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
ADAPTER_DIR = "adapter"
TRAINED_TENSORS = "trained_tensors.safetensors"
LOCK = "run.lock"
ADALORA_RANKS = "adalora_ranks.json"        # AdaLoRA: final rank and importance of every adapted module
ADALORA_RANKS_FIGURE = "adalora_ranks.png"  # ... drawn: Q-Former layer x sublayer, and the LLM's share
MODEL_CARD = "README.md"
CHECKPOINT_STATE = "state.json"  # inside checkpoint/ and best/, written last (checkpoint.py)
JOBS = "jobs"                    # run.json's key for the sweep tasks that ran the run
VISION_CACHES = ("eval", "train")  # <kind>_vision_cache.<process>.bin: the spill files of the two vision caches
SPLITS_PREDICTED = ("val", "test")


def notebook_name(key: str) -> str:
    """The file name of a notebook by its key in params/runner.yaml (train, results, analysis, ...)."""
    return load_yaml("runner.yaml")["notebooks"][key]


class RunDir:
    """Paths of one run directory and the questions asked about it (finished? by whom?)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ layout

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def run_info_file(self) -> Path:
        return self.path / RUN_INFO

    @property
    def train_log(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def best(self) -> Path:
        return self.path / BEST_DIR

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def trained_tensors(self) -> Path:
        return self.path / TRAINED_TENSORS

    @property
    def model_card(self) -> Path:
        return self.path / MODEL_CARD

    @property
    def adalora_ranks(self) -> Path:
        return self.path / ADALORA_RANKS

    @property
    def adalora_ranks_figure(self) -> Path:
        return self.path / ADALORA_RANKS_FIGURE

    @staticmethod
    def predictions_name(split: str) -> str:
        return f"predictions_{split}.jsonl"

    def predictions(self, split: str) -> Path:
        return self.path / self.predictions_name(split)

    def notebook(self, key: str) -> Path:
        return self.path / notebook_name(key)

    def vision_cache_file(self, process: int = 0, kind: str = "eval") -> Path:
        """Where process `process` spills its vision cache of `kind` ('eval': val/test images, 'train': the
        training images) beyond the RAM cap (a memory-mapped file)."""
        if kind not in VISION_CACHES:
            raise ValueError(f"vision cache kind {kind!r} (expected one of {VISION_CACHES})")
        return self.path / f"{kind}_vision_cache.{process}.bin"

    def vision_cache_files(self) -> list[Path]:
        return sorted(f for kind in VISION_CACHES for f in self.path.glob(f"{kind}_vision_cache.*.bin"))

    # ------------------------------------------------------------ state

    def metrics(self) -> dict | None:
        """metrics.json's content; None when there is none yet. A damaged file is a UserError."""
        return read_json(self.metrics_file, "metrics") if self.metrics_file.is_file() else None

    def is_finished(self) -> bool:
        """metrics.json says "finished". A damaged metrics.json is not a finished run."""
        try:
            metrics = self.metrics()
        except UserError:
            return False
        return bool(metrics) and metrics.get("status") == "finished"

    def run_info(self) -> dict:
        return read_json(self.run_info_file, "run info (is this a run's output directory?)")

    def dataset_dir(self) -> Path | None:
        """The processed dataset the run used (run.json's processed_dir), when it still exists."""
        try:
            path = Path(self.run_info()["processed_dir"])
        except (UserError, KeyError, TypeError):
            return None
        return path if path.is_dir() else None

    def finished_run_info(self) -> dict:
        """run.json of a finished run; a UserError when the run (or exported folder) is not finished."""
        info = self.run_info()
        if not self.is_finished():
            raise UserError(f"{self.path}: the run has not finished (no finished {self.metrics_file.name}); run it "
                            "to the end first")
        return info

    def progress(self) -> dict | None:
        """Where training stands as of the last checkpoint (checkpoint/state.json: epoch = epochs completed,
        global_step, ...); None before the first checkpoint or when it cannot be read."""
        found = complete_dir(self.checkpoint, CHECKPOINT_STATE)
        if found is None:
            return None
        try:
            return json.loads((found / CHECKPOINT_STATE).read_text())
        except (OSError, ValueError):
            return None

    def is_locked(self) -> bool:
        """Another process holds the run's lock: it is training in this directory now."""
        if not self.path.is_dir():
            return False
        try:
            with RunLock(self.path):
                return False
        except UserError:
            return True

    # ------------------------------------------------------------ sweep tasks (run.json's "jobs")

    def jobs(self) -> list[dict]:
        """The sweep tasks that ran this run, oldest first ([] when none, or run.json is unreadable)."""
        try:
            info = json.loads(self.run_info_file.read_text())
        except (OSError, ValueError):
            return []
        jobs = info.get(JOBS) if isinstance(info, dict) else None
        return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []

    def launch_info(self) -> dict:
        """What train() carries over when it rewrites run.json: {"jobs": [...]}, or {}."""
        jobs = self.jobs()
        return {JOBS: jobs} if jobs else {}

    def record_job(self, entry: dict) -> None:
        """Add a sweep task's entry to run.json (creating it if needed), or update the last entry of the same
        job and start (keys "job_id", "restart"). Called by the task while no training writes run.json."""
        try:
            info = read_json(self.run_info_file, "run info") if self.run_info_file.is_file() else {}
        except UserError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        jobs = self.jobs()
        last = jobs[-1] if jobs else None
        if last is not None and all(last.get(k) == entry.get(k) for k in ("job_id", "restart")):
            last.update(entry)
        else:
            jobs.append(dict(entry))
        info[JOBS] = jobs
        write_json(self.run_info_file, info)

    def check_identity(self, absent: dict | None = None, **expected) -> None:
        """A finished run of another dataset/experiment/preset/method must not pass for the one asked for.
        `absent`: what a key means in a metrics.json written before the key existed."""
        metrics = self.metrics() or {}
        for key, want in expected.items():
            have = metrics.get(key, (absent or {}).get(key))
            if key in metrics or key in (absent or {}):
                if have != want:
                    raise UserError(f"{self.path} holds a finished run of {key} '{have}', not '{want}': use "
                                    "--force (force=True) to replace it, or choose another output directory "
                                    "(--outputs)")

    def predictions_rows(self, split: str = "test") -> dict[str, dict]:
        """A split's predictions by question id ({} when the run has none)."""
        path = self.predictions(split)
        if not path.is_file():
            return {}
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {str(r["question_id"]): r for r in rows}

    # ------------------------------------------------------------ changes

    def clear(self) -> None:
        """Remove everything a training run writes (force=True), keeping the executed notebooks and the lock."""
        for d in (self.checkpoint, self.best, self.adapter, self.tensorboard):
            remove_dir(d)
        for f in (self.metrics_file, self.train_log, self.trained_tensors, self.run_info_file,
                  self.adalora_ranks, self.adalora_ranks_figure, *(self.predictions(s) for s in SPLITS_PREDICTED),
                  *self.vision_cache_files()):
            f.unlink(missing_ok=True)

    def lock(self) -> "RunLock":
        return RunLock(self.path)


def experiment_of(name: str) -> str:
    """The experiment ID of a run directory name ('28+dora' -> '28'; experiments.run_name makes them)."""
    return name.split("+", 1)[0]


def run_dirs(outputs_dir: str | os.PathLike) -> list[RunDir]:
    """Every non-empty <outputs>/<dataset>/<run name>/ whose experiment is in the registry, sorted by path."""
    from .experiments import registry

    outputs_dir = Path(outputs_dir)
    if not outputs_dir.is_dir():
        return []
    known = set(registry())
    return [RunDir(p) for p in sorted(outputs_dir.glob("*/*"))
            if p.is_dir() and experiment_of(p.name) in known and any(p.iterdir())]


# ---------------------------------------------------------------- what the notebooks show by default

def is_demo_dir(path: str | os.PathLike) -> bool:
    """An outputs directory written by `instructblip-peft demo` (<outputs>/demo/, beside its processed sample)."""
    path = Path(path)
    demo = load_yaml("runner.yaml")["demo"]
    return path.name == demo["outputs_subdir"] and (path / demo["processed_subdir"]).is_dir()


def demo_note(path: str | os.PathLike) -> str:
    return (f"These are the demo's runs (tiny random models on the bundled sample), from {path}. To show "
            "other runs, set outputs_dir in the parameters cell.")


def shown_outputs(outputs_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The runs directory a notebook shows, and a line to print about it ("" for none).

    `outputs_dir` when given. Else outputs_dir of params/paths.yaml when it holds runs; when it holds none
    but the demo has run, the demo's runs (they are never mixed into an analysis of real runs)."""
    if outputs_dir:
        root = outputs_root(outputs_dir)
        return root, demo_note(root) if is_demo_dir(root) else ""
    root = outputs_root()
    if run_dirs(root) or not run_dirs(demo_root()):
        return root, ""
    return demo_root(), demo_note(demo_root())


def browsable_runs(outputs_dir: str | os.PathLike | None = None) -> list[RunDir]:
    """The runs 00_explore's run browser lists: shown_outputs' runs; with the default outputs_dir, real
    runs first and then the demo's."""
    root, _ = shown_outputs(outputs_dir)
    runs = run_dirs(root)
    if not outputs_dir and root != demo_root():
        runs += run_dirs(demo_root())
    return runs


def shown_processed(processed_dir: str | os.PathLike | None = None,
                    outputs_dir: str | os.PathLike | None = None) -> Path:
    """The processed data 00_explore browses: `processed_dir` when given; else processed_dir of
    params/paths.yaml when it holds a dataset, or else the demo's processed sample when the demo has run."""
    from .data.records import DATASETS, MANIFEST

    if processed_dir:
        return processed_root(processed_dir)
    root, demo = processed_root(), demo_processed_root(outputs_dir)
    if any((root / d / MANIFEST).is_file() for d in DATASETS) or \
            not any((demo / d / MANIFEST).is_file() for d in DATASETS):
        return root
    return demo


class RunLock:
    """One run per output directory. flock is released by the kernel when the holder dies, so a lock
    file left by a killed run never blocks; the PID inside only serves the error message."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK
        self.fd: int | None = None

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot use output directory {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"output directory {self.path.parent} is in use by another run (pid {holder}); "
                            "wait for it to finish or choose another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            # The file stays: unlinking it would let a third run lock a new inode while a second holds the old.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        return False

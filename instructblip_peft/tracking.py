"""What a run shows while it trains: the experiment tracker, and the progress line in the terminal.

- Trackers (`report_to` in params/train.yaml) go through accelerate: tensorboard writes event files into the
  run's `tensorboard/` folder; wandb, trackio and mlflow log where their own settings say. train() logs
  train/loss, train/lr and train/samples_per_s every `log_every_steps` steps, and val/accuracy and
  train/epoch_loss at each epoch's end, all at the optimizer step. A resumed run continues the curves: the
  TensorBoard writer purges the steps after the checkpoint that an interrupted session had logged, and a W&B
  run continues under its id (kept in the checkpoint).
- The progress line: papermill keeps a notebook's own output in the executed notebook, so train() also
  appends its progress, as JSON lines, to the file named by $INSTRUCTBLIP_PEFT_PROGRESS, and the CLI shows
  them (`ProgressTail`): in a terminal one line rewritten in place (epoch, step of steps, loss, samples/s,
  ETA) and one lasting line per epoch; elsewhere (a log file, CI) only the lasting lines.

No torch or accelerate at import: the runner uses this module before any notebook starts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from .artifacts import TENSORBOARD_DIR
from .errors import UserError

PROGRESS_ENV = "INSTRUCTBLIP_PEFT_PROGRESS"
PROJECT = "instructblip-peft"      # the W&B / trackio project, the MLflow experiment
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


# ---------------------------------------------------------------- trackers

def check_tracker(report_to: str) -> None:
    """A tracker whose package is missing is an error before training starts, not a silent no-op."""
    package = PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"setting 'report_to' is '{report_to}', but the {package} package is not installed: "
                        f"pip install {package} (or -p report_to none)")


def log_with(report_to: str) -> str | None:
    """Accelerator(log_with=...) for the setting."""
    check_tracker(report_to)
    return None if report_to == "none" else report_to


def start_trackers(accelerator, report_to: str, run_dir: Path, run_name: str, config: dict,
                   resume_step: int | None, run_id: str) -> None:
    """init_trackers on the main process. `resume_step`: the checkpoint's optimizer step when resuming
    (TensorBoard then drops what an interrupted session logged after it), None on a fresh start."""
    if report_to == "none" or not accelerator.is_main_process:
        return
    tensorboard_dir = Path(run_dir) / TENSORBOARD_DIR
    kwargs = {}
    if report_to == "tensorboard" and resume_step is not None:
        _after_existing_event_files(tensorboard_dir)
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    kwargs["wandb"] = {"name": run_name, "id": run_id, "resume": "allow", "dir": str(run_dir)}
    kwargs["trackio"] = {"name": run_name, "resume": "allow"}
    kwargs["mlflow"] = {"run_name": run_name}
    # accelerate puts TensorBoard's files in <project_dir>/<project name>/: here <run>/tensorboard/.
    accelerator.init_trackers(TENSORBOARD_DIR if report_to == "tensorboard" else PROJECT, init_kwargs=kwargs)
    if report_to != "tensorboard":  # TensorBoard's hparams would add a folder per session: the settings are in run.json
        for tracker in accelerator.trackers:
            tracker.store_init_configuration(config)


def finish_trackers(accelerator) -> None:
    """Close the trackers (flushes TensorBoard's file). Not accelerator.end_training(): that also ends the
    process group of a multi-GPU launch, which a notebook running several trainings still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def _after_existing_event_files(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with its creation time in
    seconds: a session resumed within the same second as the last one waits for the next second, so its
    purge marker is read after what it purges."""
    stamps = []
    for f in folder.glob("events.out.tfevents.*"):
        try:
            stamps.append(int(f.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    if stamps and max(stamps) >= int(time.time()):
        time.sleep(max(stamps) + 1 - time.time() + 0.01)


# ---------------------------------------------------------------- the progress line: train()'s side

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class TrainingProgress:
    """train()'s progress for the CLI: JSON lines {"text", "final"} appended to $INSTRUCTBLIP_PEFT_PROGRESS.
    A no-op when the variable is unset (train() called from Python or a notebook: tqdm shows progress there)."""

    def __init__(self, label: str, enabled: bool = True, min_interval_s: float = 0.5):
        path = os.environ.get(PROGRESS_ENV) if enabled else None
        self.label, self.min_interval = label, min_interval_s
        self.file = None
        if path:
            try:
                self.file = open(path, "a", buffering=1)
            except OSError:
                self.file = None  # progress display is a convenience: never a reason for a run to fail
        self.start_time, self.start_step = time.monotonic(), 0
        self.total_steps: int | None = None
        self.loss: float | None = None
        self.samples_per_s: float | None = None
        self.last_write = 0.0

    def _write(self, text: str, final: bool) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps({"text": f"{self.label}: {text}", "final": final}) + "\n")
        except (OSError, ValueError):
            self.file = None
        self.last_write = time.monotonic()

    def started(self, epoch: int, epochs: int, step: int) -> None:
        self.start_time, self.start_step = time.monotonic(), step
        self._write(f"resuming at epoch {epoch + 1}/{epochs}, step {step}" if step else
                    f"training {epochs} epoch{'s' * (epochs != 1)}", final=True)

    def eta_s(self, step: int) -> float | None:
        done = step - self.start_step
        if not self.total_steps or done <= 0:
            return None
        return (self.total_steps - step) * (time.monotonic() - self.start_time) / done

    def _where(self, epoch: int, epochs: int, step: int) -> str:
        return f"epoch {epoch + 1}/{epochs}, step {step}/{self.total_steps or '?'}"

    def step(self, epoch: int, epochs: int, step: int) -> None:
        if self.file is None or time.monotonic() - self.last_write < self.min_interval:
            return
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        rate = f"{self.samples_per_s:.1f}" if self.samples_per_s is not None else "-"
        self._write(f"{self._where(epoch, epochs, step)}, loss {loss}, {rate} samples/s, "
                    f"ETA {_duration(self.eta_s(step))}", final=False)

    def status(self, text: str) -> None:
        """A passing line (what the run is doing now)."""
        self._write(text, final=False)

    def note(self, text: str) -> None:
        """A line that stays (something the user should know about this run)."""
        self._write(text, final=True)

    def finished(self, text: str) -> None:
        self._write(text, final=True)

    def epoch_done(self, epoch: int, epochs: int, step: int, train_loss: float | None, val_accuracy: float,
                   best: float, best_epoch: int) -> None:
        loss = f"{train_loss:.4f}" if train_loss is not None else "-"
        rate = f", {self.samples_per_s:.1f} samples/s" if self.samples_per_s is not None else ""
        self._write(f"{self._where(epoch, epochs, step)}, loss {loss}, val accuracy {val_accuracy:.4f} "
                    f"(best {best:.4f}, epoch {best_epoch}){rate}, ETA {_duration(self.eta_s(step))}", final=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---------------------------------------------------------------- the progress line: the runner's side

class ProgressTail:
    """While a notebook runs: name a fresh file in $INSTRUCTBLIP_PEFT_PROGRESS (the kernel inherits it) and
    show what train() writes there on `stream` (stderr). A terminal gets a line rewritten in place plus the
    lasting lines; anything else only the lasting lines, one per epoch."""

    def __init__(self, stream=None, poll_s: float = 0.2):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.poll_s = poll_s
        self.shown = False          # a transient line is on screen
        self.pending = ""
        self._stop = threading.Event()

    def __enter__(self) -> "ProgressTail":
        self.dir = Path(tempfile.mkdtemp(prefix="instructblip-peft-progress-"))
        self.path = self.dir / "progress.jsonl"
        self.path.touch()
        self._previous = os.environ.get(PROGRESS_ENV)
        os.environ[PROGRESS_ENV] = str(self.path)
        self._file = open(self.path)
        self._thread = threading.Thread(target=self._follow, name="progress-tail", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        self._drain()
        if self.shown:
            self._emit("\r\x1b[K")
        self._file.close()
        if self._previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = self._previous
        shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        self.pending += self._file.read()
        *lines, self.pending = self.pending.split("\n")
        transient = None
        for line in lines:
            try:
                item = json.loads(line)
                text, final = str(item["text"]), bool(item["final"])
            except (ValueError, KeyError, TypeError):
                continue
            if final:
                self._emit(("\r\x1b[K" if self.shown else "") + text + "\n")
                self.shown, transient = False, None
            else:
                transient = text
        if transient is not None and self.tty:  # only the newest of the transient lines matters
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self._emit("\r\x1b[K" + transient[:width])
            self.shown = True

    def _emit(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

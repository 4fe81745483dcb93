"""Training and evaluating one experiment on one dataset: `train(dataset, experiment, output_dir, ...)`.

The recipe (params/train.yaml): AdamW (betas 0.9/0.999, weight decay on >=2-D tensors only), a learning
rate that decays linearly to 0 once per epoch without warmup, early stopping on val accuracy, and the test
split evaluated with the best-val weights (kept as a separate copy in `best/`; LoRA is never merged).

`accelerate` does device placement, mixed precision, gradient accumulation and multi-GPU data parallelism
(`accelerate launch -m instructblip_peft run ...`). A run resumes from `checkpoint/` when started again on
the same output directory and ends exactly where an uninterrupted run would: the data order of an epoch
is a permutation seeded by (seed, epoch), consumed batches are skipped, and the RNG states are restored.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import resource
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import evaluate as evaluation  # called as evaluation.evaluate: tests plant faults in it
from . import tracking
from .accounting import count_parameters, full_qformer_size
from .artifacts import RunDir
from .config import dataset_dir as default_dataset_dir
from .config import resolve_settings
from .data.batches import QADataset, TrainCollator, epoch_batches, make_transform
from .data.prompts import render_prompt
from .data.records import load_split
from .errors import UserError
from .experiments import RANKLESS_METHODS, check_method, get_experiment
from .finetuned import write_finetuned
from .importance import method_state
from .io import atomic_dir, atomic_path, read_json, remove_dir, write_json, write_jsonl, write_text
from .lora import apply_experiment, base_model, trainable_parameters
from .model import family_of, load_model, preset_for, resolve_precision, set_gradient_checkpointing
from .stop import StopRequest
from .vision_reuse import TrainVisionCache, model_identity, reuse_plan

LOG_FIELDS = ["step", "epoch", "loss", "lr"]
# Settings that change neither the weights nor the metrics: a resumed run may change them.
RESUME_SAFE_SETTINGS = {"num_workers", "eval_batch_size", "checkpoint_every_steps", "log_every_steps",
                        "eval_vision_cache", "eval_vision_cache_ram_gb", "train_vision_cache",
                        "train_vision_cache_ram_gb", "gradient_checkpointing", "report_to"}


class NonFiniteLossError(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class TrainingStopped(UserError):
    """A stop signal arrived (under a sweep launcher, stop.py): the checkpoint is written; running again resumes."""


# ---------------------------------------------------------------- the recipe, piece by piece

def lr_for_epoch(base_lr: float, epoch: int, epochs: int) -> float:
    """Epoch e (0-based) trains at base_lr * (1 - e/epochs): linear decay to 0, stepped per epoch."""
    return base_lr * (1.0 - epoch / epochs)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (>=2-D) only; biases, norms, 1-D tensors get none."""
    decay, no_decay = [], []
    for p in trainable_parameters(model).values():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, settings, lr: float, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=lr,
                             betas=(settings.adam_beta1, settings.adam_beta2),
                             fused=device.type == "cuda")


def _enable_cpu_fp16(accelerator) -> None:
    """accelerate runs fp16 autocast and loss scaling on GPUs only; on a CPU it would silently compute in fp32
    (and fail on fp16 weights). Switch both on there as on a GPU (model.resolve_precision has checked that
    this CPU runs fp16)."""
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")


def data_workers(setting, device: torch.device) -> int:
    """num_workers 'auto': a few loader processes on CUDA (up to 4, one CPU left to the main process), so image
    decoding and tokenisation overlap the GPU's step; none on CPU, where they would take the model's cores."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus - 1))


# ---------------------------------------------------------------- small helpers

def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _load_records(dataset_dir: Path, split: str, limit: int | None = None):
    records, image_root = load_split(dataset_dir, split)
    if not records:
        raise UserError(f"{dataset_dir / (split + '.json')}: the {split} split is empty")
    return (records[:limit] if limit else records), image_root


def _trim_log(path: Path, last_step: int) -> None:
    """Keep only complete rows up to the checkpoint's step, so a resumed run writes no duplicates."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    if int(row["step"]) <= last_step and row.get("lr") not in (None, ""):
                        rows.append(row)
                except (TypeError, ValueError):
                    continue  # a line cut short by a kill
    lines = [",".join(LOG_FIELDS)] + [",".join(str(r[k]) for k in LOG_FIELDS) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def _check_resumable(run: RunDir, run_info: dict) -> None:
    """A checkpoint written with other settings must not be continued silently."""
    output_dir = run.path
    if not run.run_info_file.is_file():
        return
    old = run.run_info()
    for key in ("dataset", "experiment", "preset"):
        if old.get(key) != run_info[key]:
            raise UserError(f"{output_dir} holds a run of {key} '{old.get(key)}', not '{run_info[key]}': "
                            "choose another output directory or pass force=True to start over")
    if old.get("precision") not in (None, run_info["precision"]):
        # The same settings ("auto") resolve differently on another machine (GPU vs CPU, bf16 vs fp16).
        raise UserError(f"{output_dir} holds a checkpoint trained with precision {old['precision']}, here it would "
                        f"be {run_info['precision']}: pass -p mixed_precision {old['precision']['mixed_precision']} "
                        f"-p model_dtype {old['precision']['model_dtype']} to continue as it began, or force=True "
                        "to start over")
    changed = sorted(k for k in set(old.get("settings", {})) | set(run_info["settings"])
                     if k not in RESUME_SAFE_SETTINGS and old["settings"].get(k) != run_info["settings"].get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old['settings'].get(k)!r} -> {run_info['settings'].get(k)!r}" for k in changed)
        raise UserError(f"{output_dir} holds a checkpoint trained with other settings ({diffs}); resume with "
                        "the same settings, choose another output directory, or pass force=True to start over")


@dataclass
class TrainState:
    """Where training stands: saved in every checkpoint (as JSON), restored on resume."""
    epoch: int = 0                       # epochs completed
    iterations_in_epoch: int = 0         # batches of the current epoch consumed (on each process)
    global_step: int = 0                 # optimizer steps
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    stopped: str | None = None           # None, "max_steps" or "early_stopping"
    history: list = field(default_factory=list)   # one row per epoch: val accuracy, train loss, steps
    epoch_loss_sum: float = 0.0          # the current epoch's loss so far (as of the last checkpoint)
    epoch_loss_count: int = 0
    window_loss_sum: float = 0.0         # the current log window's loss so far
    window_count: int = 0
    train_time_s: float = 0.0            # seconds spent in training steps (for samples/s)
    train_samples: int = 0
    wall_time_s: float = 0.0             # wall time of all sessions up to the last checkpoint
    tracker_run_id: str | None = None    # the W&B run this run's curves go to (continued on resume)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in saved.items() if k in names})


# ---------------------------------------------------------------- the public entry point

def train(dataset: str, experiment, output_dir, dataset_dir=None, preset: str | None = None,
          force: bool = False, progress: bool = True, **overrides) -> dict:
    """Train (or, for zero-shot baselines, only evaluate) one experiment; return metrics.json's content.

    `dataset_dir` is the processed dataset (<processed>/<dataset>/; default from params/paths.yaml).
    Re-running on the same output_dir resumes from its checkpoint; a finished run is returned as is
    unless force=True, which starts over.
    """
    exp = get_experiment(experiment)
    preset_dict = preset_for(exp, preset)
    settings = resolve_settings(dataset, exp, preset_dict, overrides)
    check_method(exp, settings)
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else default_dataset_dir(dataset)
    run = RunDir(output_dir)

    # Checked before anything is written: an impossible precision is one error line.
    precision = resolve_precision(settings.mixed_precision, settings.model_dtype,
                                  "cuda" if torch.cuda.is_available() else "cpu")
    # A fresh AcceleratorState lets one process (a notebook) run several trainings with different
    # precision settings; the PartialState (process group of `accelerate launch`) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision.mixed_precision,
                              gradient_accumulation_steps=settings.grad_accum_steps or 1,
                              cpu=not torch.cuda.is_available(),
                              log_with=tracking.log_with(settings.report_to), project_dir=str(run.path))
    _enable_cpu_fp16(accelerator)
    # Under a sweep launcher, its preemption/time-limit signal stops training cleanly (stop.py).
    stop = StopRequest.from_environment(enabled=accelerator.num_processes == 1)
    try:
        with stop, run.lock() if accelerator.is_main_process else contextlib.nullcontext():
            if force and accelerator.is_main_process:
                run.clear()
            elif run.is_finished():
                # Runs of another method or quantization belong in another directory (experiments.run_name);
                # runs finished before the method axis existed were LoRA (where they had adapters), unquantized.
                run.check_identity(dataset=dataset, experiment=exp.id, preset=preset_dict["name"],
                                   peft_method=settings.peft_method if exp.has_lora else None,
                                   quantize=settings.quantize,
                                   absent={"peft_method": "lora" if exp.has_lora else None, "quantize": "none"})
                metrics = run.metrics()
                if progress and accelerator.is_main_process:
                    print(f"{run.path}: already finished (val {metrics['val_accuracy']:.4f}, test "
                          f"{metrics['test_accuracy']:.4f}); pass force=True to train again")
                return metrics
            accelerator.wait_for_everyone()
            job = _Run(dataset, exp, preset_dict, settings, dataset_dir, run, accelerator, progress, stop)
            try:
                return job.run()
            finally:
                job.close()
                tracking.finish_trackers(accelerator)
    except TrainingStopped as e:
        stop.exit_process(str(e))  # the lock is released: the requeued task may start at once
        raise


class _Run:
    """One training run, as named steps: setup (data, model) -> fit (epochs, checkpoints) -> finish (test)."""

    def __init__(self, dataset, exp, preset, settings, dataset_dir: Path, run: RunDir, accelerator, progress,
                 stop: StopRequest | None = None):
        self.dataset, self.exp, self.preset, self.settings = dataset, exp, preset, settings
        self.stop = stop or StopRequest()
        self.dataset_dir, self.run_dir, self.acc = dataset_dir, run, accelerator
        self.progress = progress and accelerator.is_local_main_process
        self.device = accelerator.device
        # bf16/fp16 base weights, fp32 trained tensors, autocast: the same dtype mix on any device.
        self.precision = resolve_precision(settings.mixed_precision, settings.model_dtype, self.device)
        self.start_time = time.time()
        self.wall_offset = 0.0  # time spent by earlier, interrupted sessions of this run
        self.eval_time_s = 0.0  # this session's evaluations (val every epoch, test at the end)
        self.state: TrainState | None = None
        self.live: tracking.TrainingProgress | None = None   # the CLI's progress line (tracking.py)
        self.train_vision: TrainVisionCache | None = None    # training's reuse of the frozen ViT (vision_reuse.py)
        self.train_vision_note: str | None = None            # why training does not reuse it, if it does not

    # ------------------------------------------------------------ setup

    def run_info(self) -> dict:
        s = self.settings
        return {"dataset": self.dataset, "experiment": self.exp.id, "preset": self.preset["name"],
                "llm": self.exp.llm, "family": self.exp.family,
                # Tiny presets are random models: this seed rebuilds the same base weights.
                "model_seed": s.seed, "model_source": self.preset.get("source"),
                # What "auto" resolved to here; load_finetuned rebuilds the model in this dtype.
                "precision": self.precision.to_dict(),
                "processed_dir": str(self.dataset_dir), "settings": dict(s)}

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (max_steps, or all epochs; early stopping may end it sooner)."""
        s = self.settings
        n = len(_load_records(self.dataset_dir, "train", s.max_train_samples)[0])
        batches = n // s.batch_size if s.drop_last else math.ceil(n / s.batch_size)
        per_process = math.ceil(batches / self.acc.num_processes)
        total = math.ceil(per_process / (s.grad_accum_steps or 1)) * s.epochs
        return min(total, s.max_steps) if s.max_steps else total

    def build_model(self):
        # Straight to the device: on a GPU the weights never pass through a full copy in CPU RAM (a quantized
        # LLM must be loaded there anyway: bitsandbytes weights are not moved later).
        model, processor = load_model(self.preset, dtype=self.precision.dtype, device=self.device,
                                      seed=self.settings.seed, quantize=self.settings.quantize)
        # LoRA's initial A matrices are drawn from the global torch RNG (seeded randomly at start-up):
        # seeding it makes the starting point, and so the whole run, a function of the seed.
        torch.manual_seed(self.settings.seed)
        # AdaLoRA's schedule is in optimizer steps of this run.
        total = self.total_steps() if self.exp.train and self.settings.peft_method == "adalora" else None
        model = apply_experiment(model, self.exp, self.settings, total_steps=total)
        self.method = method_state(model, self.settings)
        # Trainable tensors stay fp32 under autocast: the optimizer then updates full-precision weights.
        for p in trainable_parameters(model).values():
            p.data = p.data.float()
        if self.settings.gradient_checkpointing:
            set_gradient_checkpointing(base_model(model), True)
        return model, processor

    def load_data(self):
        # Whole splits: evaluation.evaluate applies max_eval_samples (the one place that trims them).
        self.val, self.image_root_val = _load_records(self.dataset_dir, "val")
        self.test, self.image_root_test = _load_records(self.dataset_dir, "test")

    def evaluate(self, model, split: str):
        records, root = (self.val, self.image_root_val) if split == "val" else (self.test, self.image_root_test)
        was_training = model.training
        model.eval()
        with self.acc.autocast():
            result = evaluation.evaluate(model, self.processor, records, root, self.dataset, self.settings,
                                         self.family, vision_cache=self.vision_cache, progress=self.progress,
                                         accelerator=self.acc)  # each process evaluates its share
        model.train(was_training)
        self.eval_time_s += result.wall_time_s
        return result

    # ------------------------------------------------------------ main

    def run(self) -> dict:
        self.live = tracking.TrainingProgress(f"{self.dataset} {self.exp.id}", enabled=self.acc.is_main_process)
        try:
            return self._run()
        finally:
            self.live.close()

    def _run(self) -> dict:
        run, acc = self.run_dir, self.acc
        self.load_data()
        model, self.processor = self.build_model()
        self.family = family_of(base_model(model))
        # One cache for the run: val and test images are encoded once, reused by every evaluation. Beyond its
        # RAM cap it spills to a file in the run directory, deleted when the run ends (close(), however it ends).
        self.vision_cache = evaluation.vision_cache_for(self.settings, run.vision_cache_file(acc.process_index))
        info = {**self.run_info(), **run.launch_info()}  # the sweep tasks that ran it, kept across sessions
        if self.exp.train:
            if acc.is_main_process:
                if ckpt.existing_dir(run.checkpoint) is not None:
                    _check_resumable(run, info)
                write_json(run.run_info_file, info)
            acc.wait_for_everyone()
            self.fit(model)
        elif acc.is_main_process:
            write_json(run.run_info_file, info)
        return self.finish(model)

    def close(self) -> None:
        if getattr(self, "vision_cache", None) is not None:
            self.vision_cache.close()
        if self.train_vision is not None:
            self.train_vision.close()

    def reuse_vit(self, model, transform) -> TrainVisionCache | None:
        """Training's ViT-output cache when it may be used (train_vision_cache, images not augmented, ViT frozen);
        otherwise None, said once. Empty at every (re)start: a killed session's spill file is overwritten."""
        s, base = self.settings, base_model(self.acc.unwrap_model(model))
        self.train_vision_note = reuse_plan(base, transform, s.train_vision_cache)
        if self.train_vision_note is not None:
            if self.progress:
                print(self.train_vision_note)
            self.live.note(self.train_vision_note)
            return None
        if not s.train_vision_cache:
            return None
        cache = evaluation.vision_cache_for(s, self.run_dir.vision_cache_file(self.acc.process_index, "train"),
                                            kind="train")
        identity = model_identity(preset=self.preset["name"], source=self.preset.get("source"), seed=s.seed,
                                  precision=self.precision.to_dict(), quantize=s.quantize)
        return TrainVisionCache(base, cache, identity)

    def fit(self, model) -> None:
        s, run, acc = self.settings, self.run_dir, self.acc
        train_records, image_root = _load_records(self.dataset_dir, "train", s.max_train_samples)
        transform = make_transform(self.processor, s, train=True)
        train_set = QADataset(train_records, image_root, self.dataset, transform, seed=s.seed,
                              clean_prompt=s.clean_prompt)
        self.train_vision = self.reuse_vit(model, transform)
        collator = TrainCollator(self.processor, self.family, s.max_txt_len, s.max_output_txt_len,
                                 image_keys=self.train_vision is not None)
        lengths = [len(render_prompt(r, self.dataset)) for r in train_records] if s.group_by_length else None

        optimizer = make_optimizer(model, s, lr_for_epoch(s.learning_rate, 0, s.epochs), self.device)
        model, optimizer = acc.prepare(model, optimizer)
        self.trainable = trainable_parameters(acc.unwrap_model(model))
        self.optimizer = optimizer

        # Dropout in the Q-Former (and the LLM) draws from torch's RNG: seeded here, restored on resume.
        torch.manual_seed(s.seed)
        random.seed(s.seed)
        np.random.seed(s.seed)
        self.state = state = TrainState()
        existing = ckpt.existing_dir(run.checkpoint)
        if existing is not None:
            loaded = ckpt.load_checkpoint(existing)
            ckpt.load_into(self.trainable, loaded["trainable"], existing / ckpt.TRAINABLE)
            optimizer.load_state_dict(loaded["optimizer"])
            if loaded["scaler"] is not None and acc.scaler is not None:
                acc.scaler.load_state_dict(loaded["scaler"])
            ckpt.set_rng_state(*loaded["rng"])
            self.method.load(*loaded["method"])
            self.state = state = TrainState.from_dict(loaded["state"])
            if self.progress:
                print(f"resuming {run.path} from epoch {state.epoch + 1}, step {state.global_step}")
        elif acc.is_main_process:
            run.train_log.unlink(missing_ok=True)
            remove_dir(run.tensorboard)
        if acc.is_main_process:
            _trim_log(run.train_log, state.global_step)
        self.wall_offset = state.wall_time_s
        # uuid4 draws from the OS, not from the seeded RNGs: the run stays a function of its seed.
        state.tracker_run_id = state.tracker_run_id or uuid.uuid4().hex[:16]
        config = {"dataset": self.dataset, "experiment": self.exp.id, "preset": self.preset["name"], **s}
        tracking.start_trackers(acc, s.report_to, run.path, f"{self.dataset}-{self.exp.id}", config,
                                resume_step=state.global_step if existing is not None else None,
                                run_id=state.tracker_run_id)
        self.live.started(state.epoch, s.epochs, state.global_step)

        log_file = open(run.train_log, "a", newline="") if acc.is_main_process else None
        try:
            self._epochs(model, optimizer, train_set, collator, lengths, log_file)
        finally:
            if log_file is not None:
                log_file.close()

    def save_checkpoint(self, path: Path) -> None:
        """Every process reaches this point; the main one writes the checkpoint (atomically)."""
        acc = self.acc
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.state.wall_time_s = self.wall_offset + time.time() - self.start_time
            ckpt.save_checkpoint(path, self.trainable, self.optimizer, self.state.to_dict(), acc.scaler,
                                 method=self.method.state())
        acc.wait_for_everyone()

    def _epochs(self, model, optimizer, train_set, collator, lengths, log_file):
        s, run, acc, state = self.settings, self.run_dir, self.acc, self.state
        writer = csv.writer(log_file) if log_file is not None else None
        world = acc.num_processes
        bar = tqdm(total=s.max_steps, initial=state.global_step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        workers = data_workers(s.num_workers, self.device)
        if workers:  # a forked worker cannot use tokenizers' threads (it would warn, then disable them)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        while state.stopped is None and state.epoch < s.epochs:
            if self.stop.requested:  # arrived during set-up or the last epoch's end: its checkpoint is current
                raise self._stopped()
            epoch = state.epoch
            lr = lr_for_epoch(s.learning_rate, epoch, s.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_set.set_epoch(epoch)
            batches = epoch_batches(len(train_set), s.batch_size, s.seed, epoch, lengths, s.group_by_length,
                                    drop_last=s.drop_last)
            remaining = batches[state.iterations_in_epoch * world:]
            loss_sum = torch.tensor(state.epoch_loss_sum, device=self.device)
            window_sum = torch.tensor(state.window_loss_sum, device=self.device)
            steps_per_epoch = math.ceil(math.ceil(len(batches) / world) / (s.grad_accum_steps or 1))
            if bar.total is None:
                bar.total = steps_per_epoch * s.epochs
            if self.live.total_steps is None:
                self.live.total_steps = min(steps_per_epoch * s.epochs, s.max_steps or math.inf)
            bar.set_description(f"epoch {epoch + 1}/{s.epochs}")
            model.train()
            reached_max = bool(s.max_steps and state.global_step >= s.max_steps)
            if remaining and not reached_max:
                # Its own generator: building the loader's iterator must not draw from the global torch RNG,
                # or a resumed run's dropout masks would shift by one draw.
                # Workers change nothing in the data: each item's augmentation is seeded by (seed, epoch, index).
                loader = torch.utils.data.DataLoader(train_set, batch_sampler=remaining, collate_fn=collator,
                                                     num_workers=workers, pin_memory=self.device.type == "cuda",
                                                     generator=torch.Generator())
                loader = acc.prepare(loader)
                t0 = time.time()
                epoch_from = rate_from = (t0, state.train_samples)   # samples/s over the log window / the epoch
                for batch in loader:
                    keys = batch.pop("image_keys", None)
                    with acc.accumulate(model), (self.train_vision.batch(keys) if keys is not None
                                                 else contextlib.nullcontext()):
                        loss = model(**batch).loss
                        acc.backward(loss)
                        if acc.sync_gradients and s.max_grad_norm:
                            acc.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                        optimizer.step()
                        if acc.sync_gradients:  # AdaLoRA: importance from this step's gradients, rank budget
                            self.method.after_optimizer_step(state.global_step + 1)
                        optimizer.zero_grad(set_to_none=True)
                    detached = loss.detach().float()
                    nonfinite |= ~torch.isfinite(detached)
                    loss_sum += detached
                    window_sum += detached
                    state.epoch_loss_count += 1
                    state.window_count += 1
                    state.iterations_in_epoch += 1
                    state.train_samples += len(batch["input_ids"]) * world
                    if not acc.sync_gradients:
                        continue
                    state.global_step += 1
                    bar.update(1)
                    step = state.global_step
                    at_log = step % s.log_every_steps == 0
                    reached_max = bool(s.max_steps and step >= s.max_steps)
                    # The epoch's end writes its own checkpoint after logging val accuracy at this step: one here
                    # too would let a resumed run log that step's val accuracy twice.
                    ends_epoch = reached_max or acc.gradient_state.end_of_dataloader
                    at_ckpt = step % s.checkpoint_every_steps == 0 and not ends_epoch
                    stop = self.stop.requested and not reached_max  # at max_steps: stop after the epoch's end
                    if at_log or at_ckpt or reached_max or stop:
                        self._check_finite(nonfinite, lr)
                    if at_log:
                        mean = (window_sum / state.window_count).item()
                        if writer is not None:
                            try:
                                writer.writerow([step, epoch + 1, f"{mean:.6g}", repr(lr)])
                                log_file.flush()
                            except OSError as e:  # a full disk: the log is trimmed to the checkpoint on resume
                                raise UserError(f"cannot write {run.train_log}: {e.strerror or e}") from None
                        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                        now = time.time()
                        rate = (state.train_samples - rate_from[1]) / max(now - rate_from[0], 1e-9)
                        rate_from = (now, state.train_samples)
                        self.live.loss, self.live.samples_per_s = mean, rate
                        acc.log({"train/loss": mean, "train/lr": lr, "train/samples_per_s": rate}, step=step)
                        window_sum.zero_()
                        state.window_count = 0
                    self.live.step(epoch, s.epochs, step)
                    if at_ckpt or stop:
                        state.train_time_s += time.time() - t0
                        t0 = time.time()
                        state.epoch_loss_sum = loss_sum.item()
                        state.window_loss_sum = window_sum.item()
                        self.save_checkpoint(run.checkpoint)
                    if stop:
                        raise self._stopped()
                    if reached_max:
                        break
                state.train_time_s += time.time() - t0
                self.live.samples_per_s = (state.train_samples - epoch_from[1]) / max(time.time() - epoch_from[0], 1e-9)
            self._check_finite(nonfinite, lr)
            if reached_max:
                state.stopped = "max_steps"
            state.window_loss_sum = window_sum.item()  # a log window may span the epoch's end
            self._end_epoch(model, loss_sum)
        bar.close()

    def _stopped(self) -> TrainingStopped:
        state = self.state
        return TrainingStopped(f"training stopped by {self.stop.name} at epoch {state.epoch + 1}, step "
                               f"{state.global_step}: checkpoint in {self.run_dir.checkpoint}; running again resumes")

    def _check_finite(self, nonfinite, lr):
        if nonfinite.item():
            state = self.state
            raise NonFiniteLossError(
                f"training stopped: the loss became NaN/inf (by step {state.global_step}, epoch "
                f"{state.epoch + 1}, learning rate {lr:.3g}). The last good checkpoint in "
                f"{self.run_dir.checkpoint} is kept; lower learning_rate (or use mixed_precision bf16/no) "
                "and re-run with force=True")

    def _end_epoch(self, model, loss_sum):
        s, run, acc, state = self.settings, self.run_dir, self.acc, self.state
        epoch = state.epoch
        self.live.status(f"epoch {epoch + 1}/{s.epochs}, step {state.global_step}/{self.live.total_steps}, "
                         "evaluating val")
        result = self.evaluate(acc.unwrap_model(model), "val")
        count = state.epoch_loss_count
        train_loss = (loss_sum / count).item() if count else None
        state.history.append({"epoch": epoch + 1, "val_accuracy": result.accuracy,
                              "train_loss": train_loss, "steps": state.global_step})
        acc.log({"val/accuracy": result.accuracy, "epoch": epoch + 1,
                 **({"train/epoch_loss": train_loss} if train_loss is not None else {})}, step=state.global_step)
        if state.best_val_accuracy is None or result.accuracy > state.best_val_accuracy:
            state.best_val_accuracy, state.best_epoch = result.accuracy, epoch + 1
            state.epochs_without_improvement = 0
            if acc.is_main_process:
                trainable = trainable_parameters(acc.unwrap_model(model))
                with atomic_dir(run.best) as tmp:
                    ckpt.save_tensors(tmp / ckpt.TRAINABLE, trainable)
                    write_jsonl(tmp / RunDir.predictions_name("val"), result.predictions)
                    write_json(tmp / ckpt.STATE, {"epoch": epoch + 1, "val_accuracy": result.accuracy,
                                                  "val_breakdown": result.breakdown})
        else:
            state.epochs_without_improvement += 1
            if state.epochs_without_improvement >= s.early_stopping_patience and state.stopped is None:
                state.stopped = "early_stopping"
        if self.progress:
            print(f"epoch {epoch + 1}: val accuracy {result.accuracy:.4f} (best {state.best_val_accuracy:.4f} "
                  f"at epoch {state.best_epoch})")
        self.live.epoch_done(epoch, s.epochs, state.global_step, train_loss, result.accuracy,
                             state.best_val_accuracy, state.best_epoch)
        state.epoch, state.iterations_in_epoch = epoch + 1, 0
        state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
        self.save_checkpoint(run.checkpoint)

    # ------------------------------------------------------------ the end: test on the best weights

    def finish(self, model) -> dict:
        s, run, acc, state = self.settings, self.run_dir, self.acc, self.state
        model = acc.unwrap_model(model)
        if state is not None:
            best = ckpt.existing_dir(run.best)
            if best is None:
                raise UserError(f"{run.best}: missing; the run cannot be finished (pass force=True)")
            best_info = read_json(best / ckpt.STATE, "best checkpoint info")
            if s.test_on_best:
                ckpt.load_into(trainable_parameters(model), ckpt.load_tensors(best / ckpt.TRAINABLE),
                               best / ckpt.TRAINABLE)
            val_accuracy, val_breakdown = best_info["val_accuracy"], best_info["val_breakdown"]
            val_predictions_src = best / RunDir.predictions_name("val")
        else:
            self.live.status("evaluating val")
            val = self.evaluate(model, "val")
            val_accuracy, val_breakdown = val.accuracy, val.breakdown
        self.live.status("evaluating test" + (" with the best-val weights" if state is not None and s.test_on_best
                                              else ""))
        test = self.evaluate(model, "test")
        counts = count_parameters(model)
        metrics = {
            "dataset": self.dataset, "experiment": self.exp.id, "preset": self.preset["name"],
            "llm": self.exp.llm, "label": self.exp.label,
            "rank": None if self.exp.has_lora and s.peft_method in RANKLESS_METHODS else self.exp.rank,
            "peft_method": s.peft_method if self.exp.has_lora else None, "quantize": s.quantize,
            "status": "finished",
            "val_accuracy": val_accuracy, "test_accuracy": test.accuracy,
            "val_breakdown": val_breakdown, "test_breakdown": test.breakdown,
            **counts, "full_qformer_params": full_qformer_size(model),
            "best_epoch": state.best_epoch if state else None,
            "epochs_run": state.epoch if state else 0,
            "global_steps": state.global_step if state else 0,
            "stopped": state.stopped if state else None,
            "history": state.history if state else [],
            "wall_time_s": self.wall_offset + time.time() - self.start_time,
            "train_time_s": state.train_time_s if state else 0.0,   # training steps, all sessions
            "eval_time_s": self.eval_time_s,                          # evaluations, this session
            "train_samples_per_s": (state.train_samples / state.train_time_s)
            if state and state.train_time_s > 0 else None,
            "eval_questions_per_s": test.questions_per_s or None,
            "peak_memory_mb": _peak_memory_mb(self.device),
            "eval_vision_cache": self.vision_cache.stats() if self.vision_cache is not None else None,
            # This session's (a resumed run starts it empty): images kept, batches that ran / skipped the ViT.
            "train_vision_cache": self.train_vision.stats() if self.train_vision is not None
            else ({"off": self.train_vision_note} if self.train_vision_note else None),
        }
        if acc.is_main_process:
            if state is not None:
                write_finetuned(run, model)
                self.method.write_results(run.path)
                with atomic_path(run.predictions("val")) as tmp:
                    shutil.copyfile(val_predictions_src, tmp)
            else:
                write_jsonl(run.predictions("val"), val.predictions)
            write_jsonl(run.predictions("test"), test.predictions)
            write_json(run.metrics_file, metrics)  # last: "finished" marks a complete run directory
        self.live.finished(f"val accuracy {val_accuracy:.4f}, test accuracy {test.accuracy:.4f}")
        acc.wait_for_everyone()
        return metrics

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

import csv
import math
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .artifacts import (BEST_DIR, CHECKPOINT_DIR, METRICS, RUN_INFO, TRAIN_LOG, predictions_file,
                        write_finetuned)
from .accounting import count_parameters, full_qformer_size
from .config import path_setting, resolve_settings
from .errors import UserError
from .experiments import get_experiment
from .io import atomic_path, read_json, write_json, write_jsonl, write_text
from .lora import apply_experiment, base_model, trainable_parameters
from .model import default_dtype, family_of, load_model, preset_for

LOG_FIELDS = ["step", "epoch", "loss", "lr"]
# Settings that change neither the weights nor the metrics: a resumed run may change them.
RESUME_SAFE_SETTINGS = {"num_workers", "eval_batch_size", "checkpoint_every_steps", "log_every_steps",
                        "eval_vision_cache", "gradient_checkpointing"}


class NonFiniteLossError(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


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


def mixed_precision_mode(setting: str) -> str:
    """'auto': bf16 where the GPU supports it, else fp16 (with loss scaling); no autocast on CPU."""
    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def default_processed_dir(dataset: str) -> Path:
    return path_setting("processed_dir") / dataset


# ---------------------------------------------------------------- small helpers

def _evaluation():
    # Imported on use: evaluation pulls in nothing training needs, and tests may substitute it.
    from . import evaluate
    return evaluate


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _load_records(processed_dir: Path, split: str, limit: int | None):
    from .data.records import load_split
    records, image_root = load_split(processed_dir, split)
    if not records:
        raise UserError(f"{processed_dir / (split + '.json')}: the {split} split is empty")
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


def _check_resumable(output_dir: Path, run_info: dict) -> None:
    """A checkpoint written with other settings must not be continued silently."""
    path = output_dir / RUN_INFO
    if not path.is_file():
        return
    old = read_json(path, "run info")
    for key in ("dataset", "experiment", "preset"):
        if old.get(key) != run_info[key]:
            raise UserError(f"{output_dir} holds a run of {key} '{old.get(key)}', not '{run_info[key]}': "
                            "choose another output directory or pass force=True to start over")
    changed = sorted(k for k in set(old.get("settings", {})) | set(run_info["settings"])
                     if k not in RESUME_SAFE_SETTINGS and old["settings"].get(k) != run_info["settings"].get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old['settings'].get(k)!r} -> {run_info['settings'].get(k)!r}" for k in changed)
        raise UserError(f"{output_dir} holds a checkpoint trained with other settings ({diffs}); resume with "
                        "the same settings, choose another output directory, or pass force=True to start over")


def _clear_run(output_dir: Path) -> None:
    for name in (CHECKPOINT_DIR, BEST_DIR, "adapter"):
        ckpt.remove_dir(output_dir / name)
    for name in (METRICS, TRAIN_LOG, "trained_tensors.safetensors", predictions_file("val"),
                 predictions_file("test"), RUN_INFO):
        (output_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- the public entry point

def train(dataset: str, experiment, output_dir, processed_dir=None, preset: str | None = None,
          force: bool = False, progress: bool = True, **overrides) -> dict:
    """Train (or, for zero-shot baselines, only evaluate) one experiment; return metrics.json's content.

    Re-running on the same output_dir resumes from its checkpoint; a finished run is returned as is
    unless force=True, which starts over.
    """
    exp = get_experiment(experiment)
    preset_dict = preset_for(exp, preset)
    settings = resolve_settings(dataset, exp, preset_dict, overrides)
    processed_dir = Path(processed_dir) if processed_dir is not None else default_processed_dir(dataset)
    output_dir = Path(output_dir)

    # A fresh AcceleratorState lets one process (a notebook) run several trainings with different
    # precision settings; the PartialState (process group of `accelerate launch`) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision_mode(settings.mixed_precision),
                              gradient_accumulation_steps=settings.grad_accum_steps or 1,
                              cpu=not torch.cuda.is_available())
    lock = ckpt.RunLock(output_dir) if accelerator.is_main_process else None
    if lock is not None:
        lock.__enter__()
    try:
        metrics_path = output_dir / METRICS
        if force and accelerator.is_main_process:
            _clear_run(output_dir)
        elif metrics_path.is_file():
            metrics = read_json(metrics_path, "metrics")
            if metrics.get("status") == "finished":
                for key, want in (("dataset", dataset), ("experiment", exp.id), ("preset", preset_dict["name"])):
                    if metrics.get(key) != want:
                        raise UserError(f"{output_dir} holds a finished run of {key} '{metrics.get(key)}', not "
                                        f"'{want}': choose another output directory or pass force=True")
                if progress and accelerator.is_main_process:
                    print(f"{output_dir}: already finished (val {metrics['val_accuracy']:.4f}, test "
                          f"{metrics['test_accuracy']:.4f}); pass force=True to train again")
                return metrics
        accelerator.wait_for_everyone()
        return _Run(dataset, exp, preset_dict, settings, processed_dir, output_dir, accelerator, progress).run()
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


class _Run:
    def __init__(self, dataset, exp, preset, settings, processed_dir, output_dir, accelerator, progress):
        self.dataset, self.exp, self.preset, self.settings = dataset, exp, preset, settings
        self.processed_dir, self.output_dir, self.acc = processed_dir, output_dir, accelerator
        self.progress = progress and accelerator.is_local_main_process
        self.device = accelerator.device
        self.start_time = time.time()
        self.wall_offset = 0.0  # time spent by earlier, interrupted sessions of this run

    # ------------------------------------------------------------ setup

    def run_info(self) -> dict:
        s = self.settings
        return {"dataset": self.dataset, "experiment": self.exp.id, "preset": self.preset["name"],
                "llm": self.exp.llm, "family": self.exp.family,
                # Tiny presets are random models: this seed rebuilds the same base weights.
                "model_seed": s.seed, "model_source": self.preset.get("source"),
                "processed_dir": str(self.processed_dir), "settings": dict(s)}

    def build_model(self):
        dtype = torch.float32 if self.device.type == "cpu" else default_dtype(self.device)
        info = self.run_info()
        model, processor = load_model(self.preset, dtype=dtype, device="cpu", seed=info["model_seed"])
        # LoRA's initial A matrices are drawn from the global torch RNG (seeded randomly at start-up):
        # seeding it makes the starting point, and so the whole run, a function of the seed.
        torch.manual_seed(self.settings.seed)
        model = apply_experiment(model, self.exp)
        # Trainable tensors stay fp32 under autocast: the optimizer then updates full-precision weights.
        for p in trainable_parameters(model).values():
            p.data = p.data.float()
        if self.settings.gradient_checkpointing:
            base_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, processor

    def load_data(self):
        s = self.settings
        self.val, self.image_root_val = _load_records(self.processed_dir, "val", s.max_eval_samples)
        self.test, self.image_root_test = _load_records(self.processed_dir, "test", s.max_eval_samples)

    def evaluate(self, model, split: str):
        ev = _evaluation()
        records, root = (self.val, self.image_root_val) if split == "val" else (self.test, self.image_root_test)
        was_training = model.training
        model.eval()
        t0 = time.time()
        with self.acc.autocast():
            result = ev.evaluate(model, self.processor, records, root, self.dataset, self.settings, self.family,
                                 vision_cache=self.vision_cache, progress=self.progress)
        self.eval_seconds[split] = time.time() - t0
        model.train(was_training)
        return result

    # ------------------------------------------------------------ main

    def run(self) -> dict:
        out, acc = self.output_dir, self.acc
        self.load_data()
        model, self.processor = self.build_model()
        self.family = family_of(base_model(model))
        # One cache for the run: val and test images are encoded once, reused by every evaluation.
        self.vision_cache = _evaluation().vision_cache_for(self.settings)
        self.eval_seconds: dict = {}
        info = self.run_info()
        state = None
        if self.exp.train:
            if acc.is_main_process:
                existing = ckpt.existing_dir(out / CHECKPOINT_DIR)
                if existing is not None:
                    _check_resumable(out, info)
                write_json(out / RUN_INFO, info)
            acc.wait_for_everyone()
            state = self.fit(model)
        elif acc.is_main_process:
            write_json(out / RUN_INFO, info)
        return self.finish(model, state)

    def fit(self, model) -> dict:
        s, out, acc = self.settings, self.output_dir, self.acc
        from .data.batches import QADataset, TrainCollator, epoch_batches, make_transform
        train_records, image_root = _load_records(self.processed_dir, "train", s.max_train_samples)
        train_set = QADataset(train_records, image_root, self.dataset, make_transform(self.processor, s, train=True),
                              seed=s.seed, clean_prompt=s.clean_prompt)
        collator = TrainCollator(self.processor, self.family, s.max_txt_len, s.max_output_txt_len)
        lengths = None
        if s.group_by_length:
            from .data.prompts import render_prompt
            lengths = [len(render_prompt(r, self.dataset)) for r in train_records]

        optimizer = make_optimizer(model, s, lr_for_epoch(s.learning_rate, 0, s.epochs), self.device)
        model, optimizer = acc.prepare(model, optimizer)
        trainable = trainable_parameters(acc.unwrap_model(model))

        # Dropout in the Q-Former (and the LLM) draws from torch's RNG: seeded here, restored on resume.
        torch.manual_seed(s.seed)
        random.seed(s.seed)
        np.random.seed(s.seed)
        state = {"epoch": 0, "iterations_in_epoch": 0, "global_step": 0, "best_val_accuracy": None,
                 "best_epoch": None, "epochs_without_improvement": 0, "stopped": None, "history": [],
                 "epoch_loss_sum": 0.0, "epoch_loss_count": 0, "window_loss_sum": 0.0, "window_count": 0,
                 "train_time_s": 0.0, "train_samples": 0, "wall_time_s": 0.0}
        log_path = out / TRAIN_LOG
        existing = ckpt.existing_dir(out / CHECKPOINT_DIR)
        if existing is not None:
            loaded = ckpt.load_checkpoint(existing)
            ckpt.load_into(trainable, loaded["trainable"], existing / ckpt.TRAINABLE)
            optimizer.load_state_dict(loaded["optimizer"])
            if loaded["scaler"] is not None and acc.scaler is not None:
                acc.scaler.load_state_dict(loaded["scaler"])
            ckpt.set_rng_state(*loaded["rng"])
            state.update(loaded["state"])
            if self.progress:
                print(f"resuming {out} from epoch {state['epoch'] + 1}, step {state['global_step']}")
        elif acc.is_main_process:
            (out / TRAIN_LOG).unlink(missing_ok=True)
        if acc.is_main_process:
            _trim_log(log_path, state["global_step"])
        self.wall_offset = state["wall_time_s"]

        def save(path: Path, extra_state: dict | None = None):
            acc.wait_for_everyone()
            if acc.is_main_process:
                state["wall_time_s"] = self.wall_offset + time.time() - self.start_time
                ckpt.save_checkpoint(path, trainable, optimizer, dict(state, **(extra_state or {})), acc.scaler)
            acc.wait_for_everyone()

        log_file = open(log_path, "a", newline="") if acc.is_main_process else None
        try:
            self._epochs(model, optimizer, train_set, collator, lengths, epoch_batches, state, save, log_file)
        finally:
            if log_file is not None:
                log_file.close()
        return state

    def _epochs(self, model, optimizer, train_set, collator, lengths, epoch_batches, state, save, log_file):
        s, out, acc = self.settings, self.output_dir, self.acc
        writer = csv.writer(log_file) if log_file is not None else None
        world = acc.num_processes
        total_steps_hint = s.max_steps
        bar = tqdm(total=total_steps_hint, initial=state["global_step"], desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        while state["stopped"] is None and state["epoch"] < s.epochs:
            epoch = state["epoch"]
            lr = lr_for_epoch(s.learning_rate, epoch, s.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_set.set_epoch(epoch)
            batches = epoch_batches(len(train_set), s.batch_size, s.seed, epoch, lengths, s.group_by_length,
                                    drop_last=s.drop_last)
            remaining = batches[state["iterations_in_epoch"] * world:]
            loss_sum = torch.tensor(state["epoch_loss_sum"], device=self.device)
            window_sum = torch.tensor(state["window_loss_sum"], device=self.device)
            steps_per_epoch = math.ceil(math.ceil(len(batches) / world) / (s.grad_accum_steps or 1))
            if bar.total is None:
                bar.total = steps_per_epoch * s.epochs
            bar.set_description(f"epoch {epoch + 1}/{s.epochs}")
            model.train()
            reached_max = bool(s.max_steps and state["global_step"] >= s.max_steps)
            if remaining and not reached_max:
                # Its own generator: building the loader's iterator must not draw from the global torch RNG,
                # or a resumed run's dropout masks would shift by one draw.
                loader = torch.utils.data.DataLoader(train_set, batch_sampler=remaining, collate_fn=collator,
                                                     num_workers=s.num_workers, generator=torch.Generator())
                loader = acc.prepare(loader)
                t0 = time.time()
                for batch in loader:
                    with acc.accumulate(model):
                        loss = model(**batch).loss
                        acc.backward(loss)
                        if acc.sync_gradients and s.max_grad_norm:
                            acc.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    detached = loss.detach().float()
                    nonfinite |= ~torch.isfinite(detached)
                    loss_sum += detached
                    window_sum += detached
                    state["epoch_loss_count"] += 1
                    state["window_count"] += 1
                    state["iterations_in_epoch"] += 1
                    state["train_samples"] += len(batch["input_ids"]) * world
                    if not acc.sync_gradients:
                        continue
                    state["global_step"] += 1
                    bar.update(1)
                    step = state["global_step"]
                    at_log = step % s.log_every_steps == 0
                    at_ckpt = step % s.checkpoint_every_steps == 0
                    reached_max = bool(s.max_steps and step >= s.max_steps)
                    if at_log or at_ckpt or reached_max:
                        self._check_finite(nonfinite, state, lr)
                    if at_log:
                        mean = (window_sum / state["window_count"]).item()
                        if writer is not None:
                            try:
                                writer.writerow([step, epoch + 1, f"{mean:.6g}", repr(lr)])
                                log_file.flush()
                            except OSError as e:  # a full disk: the log is trimmed to the checkpoint on resume
                                raise UserError(f"cannot write {out / TRAIN_LOG}: {e.strerror or e}") from None
                        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                        window_sum.zero_()
                        state["window_count"] = 0
                    if at_ckpt:
                        state["train_time_s"] += time.time() - t0
                        t0 = time.time()
                        state["epoch_loss_sum"] = loss_sum.item()
                        state["window_loss_sum"] = window_sum.item()
                        save(self.output_dir / CHECKPOINT_DIR)
                    if reached_max:
                        break
                state["train_time_s"] += time.time() - t0
            self._check_finite(nonfinite, state, lr)
            if reached_max:
                state["stopped"] = "max_steps"
            state["window_loss_sum"] = window_sum.item()  # a log window may span the epoch's end
            self._end_epoch(model, state, loss_sum, save)
        bar.close()

    def _check_finite(self, nonfinite, state, lr):
        if nonfinite.item():
            raise NonFiniteLossError(
                f"training stopped: the loss became NaN/inf (by step {state['global_step']}, epoch "
                f"{state['epoch'] + 1}, learning rate {lr:.3g}). The last good checkpoint in "
                f"{self.output_dir / CHECKPOINT_DIR} is kept; lower learning_rate (or use mixed_precision bf16/no) "
                "and re-run with force=True")

    def _end_epoch(self, model, state, loss_sum, save):
        s, out, acc = self.settings, self.output_dir, self.acc
        epoch = state["epoch"]
        result = self.evaluate(acc.unwrap_model(model), "val")
        count = state["epoch_loss_count"]
        state["history"].append({"epoch": epoch + 1, "val_accuracy": result.accuracy,
                                 "train_loss": (loss_sum / count).item() if count else None,
                                 "steps": state["global_step"]})
        best = state["best_val_accuracy"]
        if best is None or result.accuracy > best:
            state["best_val_accuracy"], state["best_epoch"] = result.accuracy, epoch + 1
            state["epochs_without_improvement"] = 0
            if acc.is_main_process:
                trainable = trainable_parameters(acc.unwrap_model(model))
                with ckpt.write_dir(out / BEST_DIR) as tmp:
                    ckpt.save_tensors(tmp / ckpt.TRAINABLE, trainable)
                    write_jsonl(tmp / predictions_file("val"), result.predictions)
                    write_json(tmp / ckpt.STATE, {"epoch": epoch + 1, "val_accuracy": result.accuracy,
                                                  "val_breakdown": result.breakdown})
        else:
            state["epochs_without_improvement"] += 1
            if state["epochs_without_improvement"] >= s.early_stopping_patience and state["stopped"] is None:
                state["stopped"] = "early_stopping"
        if self.progress:
            print(f"epoch {epoch + 1}: val accuracy {result.accuracy:.4f} (best {state['best_val_accuracy']:.4f} "
                  f"at epoch {state['best_epoch']})")
        state.update(epoch=epoch + 1, iterations_in_epoch=0, epoch_loss_sum=0.0, epoch_loss_count=0)
        save(out / CHECKPOINT_DIR)

    # ------------------------------------------------------------ the end: test on the best weights

    def finish(self, model, state) -> dict:
        s, out, acc = self.settings, self.output_dir, self.acc
        model = acc.unwrap_model(model)
        val_breakdown = None
        if state is not None:
            best = ckpt.existing_dir(out / BEST_DIR)
            if best is None:
                raise UserError(f"{out / BEST_DIR}: missing; the run cannot be finished (pass force=True)")
            best_info = read_json(best / ckpt.STATE, "best checkpoint info")
            if s.test_on_best:
                ckpt.load_into(trainable_parameters(model), ckpt.load_tensors(best / ckpt.TRAINABLE),
                               best / ckpt.TRAINABLE)
            val_accuracy, val_breakdown = best_info["val_accuracy"], best_info["val_breakdown"]
            val_predictions_src = best / predictions_file("val")
        else:
            val = self.evaluate(model, "val")
            val_accuracy, val_breakdown = val.accuracy, val.breakdown
        test = self.evaluate(model, "test")
        counts = count_parameters(model)
        metrics = {
            "dataset": self.dataset, "experiment": self.exp.id, "preset": self.preset["name"],
            "llm": self.exp.llm, "group": self.exp.label, "rank": self.exp.rank, "status": "finished",
            "val_accuracy": val_accuracy, "test_accuracy": test.accuracy,
            "val_breakdown": val_breakdown, "test_breakdown": test.breakdown,
            **counts, "full_qformer_params": full_qformer_size(model),
            "best_epoch": state["best_epoch"] if state else None,
            "epochs_run": state["epoch"] if state else 0,
            "global_steps": state["global_step"] if state else 0,
            "stopped": state["stopped"] if state else None,
            "history": state["history"] if state else [],
            "wall_time_s": self.wall_offset + time.time() - self.start_time,
            "train_samples_per_s": (state["train_samples"] / state["train_time_s"])
            if state and state["train_time_s"] > 0 else None,
            "eval_questions_per_s": len(self.test) / self.eval_seconds["test"]
            if self.eval_seconds.get("test") else None,
            "peak_memory_mb": _peak_memory_mb(self.device),
        }
        if acc.is_main_process:
            if state is not None:
                write_finetuned(out, model)
                with atomic_path(out / predictions_file("val")) as tmp:
                    shutil.copyfile(val_predictions_src, tmp)
            else:
                write_jsonl(out / predictions_file("val"), val.predictions)
            write_jsonl(out / predictions_file("test"), test.predictions)
            write_json(out / METRICS, metrics)
        acc.wait_for_everyone()
        return metrics

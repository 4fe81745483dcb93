"""Helpers for training tests: a small processed dataset of colour questions on solid-colour images (the
answer is the image's colour, so a model that learns to look at the image beats chance), fast settings, and
the comparison of a resumed run's end state with an uninterrupted run's.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from instructblip_peft.io import write_json

# Tiny models gain nothing from threads, and on a shared, busy CPU several threads per process spin against
# each other (a 40x slowdown measured). Subprocesses of these tests get the same via SINGLE_THREAD_ENV,
# which also keeps their floating-point results identical to this process's.
torch.set_num_threads(1)
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}


def colour_records(n: int, split: str, rng: random.Random) -> list[dict]:
    names = list(COLOURS)
    out = []
    for i in range(n):
        colour = rng.choice(names)
        choices = rng.sample(names, 2)
        if colour not in choices:
            choices[rng.randrange(2)] = colour
        answer = choices.index(colour)
        out.append({"question_id": f"{split}-{i}", "image": f"{colour}.png",
                    "question": "Which color is the picture?", "choices": choices, "answer_index": answer,
                    "answer": f"({'ab'[answer]}) {colour}", "context": "",
                    "meta": {"subject": "natural science", "grade": "grade3", "has_hint": False,
                             "has_image": True, "topic": "colors", "category": "colour"}})
    return out


def make_colour_dataset(root: Path, n_train: int = 32, n_eval: int = 16, seed: int = 0) -> Path:
    """`root/scienceqa/` in the processed layout (train/val/test.json + manifest.json)."""
    rng = random.Random(seed)
    d = Path(root) / "scienceqa"
    images = d / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(images / f"{name}.png")
    counts = {}
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        records = colour_records(n, split, rng)
        write_json(d / f"{split}.json", records)
        counts[split] = n
    write_json(d / "manifest.json", {"dataset": "scienceqa", "source": "test", "image_root": str(images.absolute()),
                                     "counts": counts, "options": {}, "dropped": {}})
    return d


# Fast settings for tests: few samples, frequent checkpoints and logs, no augmentation noise in order.
FAST = dict(epochs=2, batch_size=4, grad_accum_steps=1, max_train_samples=16, max_eval_samples=8,
            eval_batch_size=8, log_every_steps=1, checkpoint_every_steps=2)


# ---------------------------------------------------------------- interrupted runs end like uninterrupted ones

EXPERIMENT = "31"  # Q-Former + LLM LoRA: the Q-Former's dropout makes the torch RNG part of the state
SETTINGS = dict(FAST, epochs=3, learning_rate=1e-2, checkpoint_every_steps=2)
# What a session measured (a resumed run's last session did less), and what the vision caches hold (a resumed
# session starts its training cache empty): not part of the run's result.
TIMING_KEYS = {"wall_time_s", "train_time_s", "eval_time_s", "train_samples_per_s", "eval_questions_per_s",
               "peak_memory_mb", "eval_vision_cache", "train_vision_cache"}


class Stopped(BaseException):
    """Raised by stop_after_checkpoint: not an Exception, so nothing in train() handles it."""


def stop_after_checkpoint(monkeypatch, n: int) -> None:
    """Make the n-th checkpoint the last thing a run does (as a kill right after it would): it raises Stopped."""
    from instructblip_peft import checkpoint as ckpt

    real, saves = ckpt.save_checkpoint, [0]

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        saves[0] += 1
        if saves[0] == n:
            raise Stopped

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)


def final_state(out: Path) -> dict:
    """Everything a finished run leaves that must not depend on interruptions (timings excluded)."""
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "train_log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    return {
        "metrics": {k: v for k, v in metrics.items() if k not in TIMING_KEYS},
        "last": load_file(out / "checkpoint" / "trainable.safetensors"),
        "best": load_file(out / "trained_tensors.safetensors"),
        "adapter": load_file(out / "adapter" / "adapter_model.safetensors"),
        "predictions": [(out / f"predictions_{s}.jsonl").read_text() for s in ("val", "test")],
        "log": log,
        # samples/s is a timing: only its steps must match
        "curves": {tag: [s for s, _ in v] if tag == "train/samples_per_s" else v
                   for tag, v in curves(out).items()},
    }


def assert_same_run(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    for key in ("last", "best", "adapter"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}: {name} differs"
    assert a["predictions"] == b["predictions"]
    assert a["log"] == b["log"]
    assert a["curves"] == b["curves"]


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars as written to its event files: tag -> [(step, value), ...], as
    TensorBoard reads them (a resumed session's purge of the steps after its checkpoint applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

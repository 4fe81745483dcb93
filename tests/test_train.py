"""The training engine on a tiny model (CPU): the recipe, the run's artifacts, re-runs, locks, bad input."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructblip_peft.finetuned import load_finetuned
from instructblip_peft.artifacts import RunLock
from instructblip_peft.data.batches import epoch_batches
from instructblip_peft.errors import UserError
from instructblip_peft.evaluate import evaluate
from instructblip_peft.experiments import get_experiment
from instructblip_peft.lora import apply_experiment, trainable_parameters
from instructblip_peft.model import load_model
from instructblip_peft.train import NonFiniteLossError, lr_for_epoch, param_groups, train

from train_fixtures import FAST, SINGLE_THREAD_ENV, make_colour_dataset

# Q-Former + LLM LoRA (rank 4, FlanT5 family): LoRA on both sides plus the always-trained tensors.
EXPERIMENT = "31"
SETTINGS = dict(FAST, epochs=3, learning_rate=1e-2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("processed"))


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train("scienceqa", EXPERIMENT, out, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    return out


def log_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the recipe

def test_weight_decay_only_on_matrices():
    model, _ = load_model("tiny-t5")
    model = apply_experiment(model, get_experiment(EXPERIMENT))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and no_decay["params"]
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"])  # biases, layer norms
    grouped = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert grouped == {id(p) for p in trainable_parameters(model).values()}


def test_lr_decays_linearly_per_epoch_without_warmup():
    assert [lr_for_epoch(1.0, e, 4) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_log_follows_the_schedule_and_loss_falls(run_dir):
    rows = log_rows(run_dir / "train_log.csv")
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(1, len(rows) + 1))  # one row per step, no duplicates
    by_epoch = {}
    for r in rows:
        by_epoch.setdefault(int(r["epoch"]), []).append(r)
    lr = SETTINGS["learning_rate"]
    for epoch, epoch_rows in by_epoch.items():
        assert [float(r["lr"]) for r in epoch_rows] == pytest.approx([lr * (1 - (epoch - 1) / 3)] * len(epoch_rows))
    mean = {e: sum(float(r["loss"]) for r in rs) / len(rs) for e, rs in by_epoch.items()}
    assert mean[3] < mean[1] - 0.1


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_batches(10, 4, seed=42, epoch=0)
    assert a == epoch_batches(10, 4, seed=42, epoch=0)
    assert a != epoch_batches(10, 4, seed=42, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [4, 4, 2]
    lengths = [i % 5 for i in range(100)]
    grouped = epoch_batches(100, 10, seed=42, epoch=0, lengths=lengths, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(100))
    assert all(len({lengths[i] for i in b}) <= 2 for b in grouped)  # similar lengths share a batch


# ---------------------------------------------------------------- artifacts

def test_run_writes_its_artifacts(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["experiment"] == EXPERIMENT
    for key in ("val_accuracy", "test_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["trainable_params"] > metrics["lora_params"] > 0
    assert metrics["total_params"] > metrics["full_qformer_params"] > 0
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] == 3
    assert metrics["val_accuracy"] == max(h["val_accuracy"] for h in metrics["history"])
    assert "NAT" in metrics["val_breakdown"] and "IMG" in metrics["test_breakdown"]
    for key in ("wall_time_s", "train_samples_per_s", "eval_questions_per_s", "peak_memory_mb"):
        assert metrics[key] > 0
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    tensors = load_file(run_dir / "trained_tensors.safetensors")
    assert "query_tokens" in tensors and not any("lora_" in k for k in tensors)
    preds = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert len(preds) == SETTINGS["max_eval_samples"]
    assert set(preds[0]) >= {"question_id", "predicted", "answer", "correct", "scores"}
    run = json.loads((run_dir / "run.json").read_text())
    assert run["experiment"] == EXPERIMENT and run["preset"] == "tiny-t5" and "model_seed" in run


def test_reloaded_model_reproduces_predictions_in_a_fresh_process(run_dir, data):
    """load_finetuned's model gives the recorded test predictions (made with the restored best weights,
    not the last epoch's) and the recorded val accuracy."""
    script = (
        "import json, sys\n"
        "from instructblip_peft.finetuned import load_finetuned\n"
        "from instructblip_peft.data.records import load_split\n"
        "from instructblip_peft.evaluate import evaluate\n"
        "model, processor, info = load_finetuned(sys.argv[1])\n"
        "out = {}\n"
        "for split in ('val', 'test'):\n"
        "    records, root = load_split(sys.argv[2], split)\n"
        "    r = evaluate(model, processor, records, root, 'scienceqa', info['settings'], 't5', progress=False)\n"
        "    out[split] = {'accuracy': r.accuracy, 'predictions': r.predictions}\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(run_dir), str(data)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **SINGLE_THREAD_ENV})
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert fresh["val"]["accuracy"] == metrics["val_accuracy"]
    assert fresh["test"]["accuracy"] == metrics["test_accuracy"]
    recorded = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert fresh["test"]["predictions"] == recorded


def test_finished_run_is_not_retrained(run_dir, data):
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}
    metrics = train("scienceqa", EXPERIMENT, run_dir, dataset_dir=data, preset="tiny", progress=False,
                    **SETTINGS)
    assert metrics == json.loads((run_dir / "metrics.json").read_text())
    after = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file() and p.name != "run.lock"}
    assert after == {k: v for k, v in before.items() if k != "run.lock"}


def test_finished_run_of_another_preset_is_not_passed_off_as_this_one(run_dir, data, monkeypatch):
    import instructblip_peft.train as train_module
    real = train_module.preset_for
    monkeypatch.setattr(train_module, "preset_for", lambda exp, preset: dict(real(exp, "tiny"), name="t5-custom"))
    with pytest.raises(UserError, match="holds a finished run of preset 'tiny-t5', not 't5-custom'"):
        train("scienceqa", EXPERIMENT, run_dir, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)


def test_zero_shot_only_evaluates(data, tmp_path):
    metrics = train("scienceqa", "zeroshot-flant5xl", tmp_path, dataset_dir=data, preset="tiny", progress=False,
                    max_eval_samples=8)
    assert metrics["status"] == "finished" and metrics["trainable_params"] == 0 and metrics["epochs_run"] == 0
    assert (tmp_path / "predictions_val.jsonl").is_file() and (tmp_path / "predictions_test.jsonl").is_file()
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "checkpoint").exists()
    model, processor, info = load_finetuned(tmp_path)
    records = json.loads((data / "val.json").read_text())
    result = evaluate(model, processor, records, data / "images", "scienceqa", info["settings"], "t5", progress=False)
    assert result.accuracy == metrics["val_accuracy"]


# ---------------------------------------------------------------- refusals

def test_second_run_on_the_same_directory_is_refused(data, tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UserError, match=r"in use by another run \(pid \d+\)"):
            train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)


def test_stale_lock_of_a_dead_process_does_not_block(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(dead.stdout)
    with RunLock(tmp_path):
        assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())


def test_non_finite_loss_stops_with_a_clear_message(data, tmp_path):
    with pytest.raises(NonFiniteLossError, match="NaN/inf.*last good checkpoint.*learning_rate"):
        train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False,
              **dict(SETTINGS, learning_rate=1e30, checkpoint_every_steps=1, max_steps=6))
    assert not (tmp_path / "metrics.json").exists()
    if (tmp_path / "checkpoint").exists():
        saved = load_file(tmp_path / "checkpoint" / "trainable.safetensors")
        assert all(torch.isfinite(t).all() for t in saved.values())


def test_resuming_with_other_settings_is_refused(data, tmp_path):
    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False,
          **dict(SETTINGS, max_steps=1))
    (tmp_path / "metrics.json").unlink()  # as if killed before the end
    with pytest.raises(UserError, match=r"other settings \(learning_rate: 0.01 -> 0.02"):
        train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False,
              **dict(SETTINGS, max_steps=1, learning_rate=0.02))


def test_unusable_output_directory_is_a_user_error(data, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot use output directory"):
        train("scienceqa", EXPERIMENT, tmp_path / "file" / "run", dataset_dir=data, preset="tiny",
              progress=False, **SETTINGS)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_directory_is_a_user_error(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot"):
            train("scienceqa", EXPERIMENT, out, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    finally:
        out.chmod(0o755)

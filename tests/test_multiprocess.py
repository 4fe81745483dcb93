"""Data-parallel training on CPU: two processes learn the task as well as one, each on half the batches.

The processes are started as a user would: `accelerate launch --multi_gpu --num_processes 2`, which on a
machine without GPUs runs two CPU processes in a gloo process group (accelerate's MULTI_CPU). Note that
`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15: --cpu picks its
single-process launcher."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from train_fixtures import FAST, SINGLE_THREAD_ENV, make_colour_dataset

# Q-Former + LLM LoRA (rank 4, FlanT5 family). With two processes each takes its own batch of 4, so an
# epoch has half the optimizer steps; the extra epochs give both runs room to learn the colours.
EXPERIMENT = "31"
SETTINGS = dict(FAST, epochs=6, learning_rate=1e-2, max_train_samples=64, max_eval_samples=16, early_stopping_patience=6)

DRIVER = textwrap.dedent("""
    import json, sys
    from instructblip_peft.train import train
    out, data, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    train("scienceqa", "{experiment}", out, dataset_dir=data, preset="tiny", progress=False, **settings)
""").format(experiment=EXPERIMENT)


def run(tmp_path, data, name: str, processes: int) -> dict:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / name
    launcher = [sys.executable, str(driver)] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(driver)]
    env = dict(os.environ, **SINGLE_THREAD_ENV)
    proc = subprocess.run(launcher + [str(out), str(data), json.dumps(SETTINGS)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_reach_the_accuracy_band_of_one(tmp_path):
    data = make_colour_dataset(tmp_path / "processed", n_train=64, n_eval=16)
    one = run(tmp_path, data, "one", 1)
    two = run(tmp_path, data, "two", 2)
    print(f"val accuracy: 1 process {one['val_accuracy']:.3f}, 2 processes {two['val_accuracy']:.3f}; "
          f"test: {one['test_accuracy']:.3f} vs {two['test_accuracy']:.3f}")
    # Two colours per question (chance 0.5); 16 eval questions, so one question moves accuracy by 0.0625.
    for metrics in (one, two):
        assert metrics["status"] == "finished"
        assert metrics["val_accuracy"] >= 0.5
    assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.25
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.25
    # The two processes split each epoch's batches between them: half the optimizer steps per epoch.
    steps = {name: len((tmp_path / name / "train_log.csv").read_text().splitlines()) - 1 for name in ("one", "two")}
    assert steps["two"] / two["epochs_run"] == pytest.approx(steps["one"] / one["epochs_run"] / 2, abs=1)

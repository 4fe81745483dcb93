"""A run killed at any point (SIGKILL, right after a checkpoint) and started again ends exactly where an
uninterrupted run ends: same trainable weights, metrics, predictions and log."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructblip_peft.train import train

from train_fixtures import (EXPERIMENT, SETTINGS, SINGLE_THREAD_ENV, Stopped, assert_same_run, curves, final_state,
                            stop_after_checkpoint)

# Fixtures from conftest.py: data (the processed colour dataset), uninterrupted (final_state of the same run
# never interrupted).

TRAIN_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[3])
import train_fixtures  # single-threaded like the test process
from instructblip_peft.train import train
train("scienceqa", sys.argv[1], sys.argv[2], dataset_dir=sys.argv[4], preset="tiny", progress=False,
      **{k: v for k, v in __import__("json").loads(sys.argv[5]).items()})
"""


def checkpoint_state(out: Path) -> dict | None:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return None


def start_and_kill(out: Path, data: Path, settings: dict, when) -> dict:
    """Run training in a subprocess; SIGKILL it as soon as a checkpoint satisfies `when`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, EXPERIMENT, str(out), str(Path(__file__).parent), str(data),
         json.dumps(settings)],
        env={**os.environ, **SINGLE_THREAD_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            state = checkpoint_state(out)
            if state is not None and when(state):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return state
            if proc.poll() is not None:
                pytest.fail(f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        pytest.fail("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_mid_epoch_resumes_to_the_same_end(data, uninterrupted, tmp_path):
    # Step 6 is in the middle of epoch 2: resume must skip the epoch's consumed batches and restore RNGs.
    killed = start_and_kill(tmp_path, data, SETTINGS,
                            lambda s: s["global_step"] >= 6 and s["iterations_in_epoch"] > 0)
    assert not (tmp_path / "metrics.json").exists()
    assert killed["epoch"] >= 1
    # What the killed session may have logged after its checkpoint: the resumed one replaces it.
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(tmp_path / "tensorboard") as stray:
        stray.add_scalar("train/loss", 999.0, killed["global_step"] + 1)
        stray.add_scalar("val/accuracy", 999.0, killed["global_step"] + 1)
    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    assert_same_run(final_state(tmp_path), uninterrupted)


def test_killed_twice_at_epoch_ends_resumes_to_the_same_end(data, uninterrupted, tmp_path):
    # Killed right after epoch 1's checkpoint, then after epoch 2's: the best/ copy, the early-stopping
    # counters and the log all carry over.
    start_and_kill(tmp_path, data, SETTINGS, lambda s: s["epoch"] >= 1)
    start_and_kill(tmp_path, data, SETTINGS, lambda s: s["epoch"] >= 2)
    assert not (tmp_path / "metrics.json").exists()
    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    assert_same_run(final_state(tmp_path), uninterrupted)


def test_force_starts_over(data, uninterrupted, tmp_path):
    settings = dict(SETTINGS, max_steps=2)
    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **settings)
    (tmp_path / "train_log.csv").write_text("step,epoch,loss,lr\n99,9,0.0,0.0\n")  # would survive a resume
    metrics = train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False,
                    force=True, **settings)
    assert metrics["global_steps"] == 2
    assert [r.split(",")[0] for r in (tmp_path / "train_log.csv").read_text().split()[1:]] == ["1", "2"]
    assert [s for s, _ in curves(tmp_path)["train/loss"]] == [1, 2]


def test_data_loader_workers_change_nothing_and_resume_exactly(data, uninterrupted, tmp_path, monkeypatch):
    """Two loader processes (what num_workers 'auto' gives on a GPU is a few): stopped mid-epoch right after a
    checkpoint, as a kill would, and resumed with workers again, the run ends exactly like the uninterrupted
    one that loaded its data in the main process."""
    settings = dict(SETTINGS, num_workers=2)
    with monkeypatch.context() as m:
        stop_after_checkpoint(m, 3)  # step 6: the middle of epoch 2 (checkpoints at steps 2, 4 = epoch 1's end, 6)
        with pytest.raises(Stopped):
            train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **settings)
    assert checkpoint_state(tmp_path)["global_step"] == 6 and checkpoint_state(tmp_path)["iterations_in_epoch"] == 2
    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **settings)
    assert_same_run(final_state(tmp_path), uninterrupted)

"""Every method and quantization trains, resumes exactly and reloads on CPU, with both model families.

Each case trains a Q-Former+LLM experiment briefly on the colour dataset, once uninterrupted and once
interrupted right after a mid-run checkpoint and started again: both must end identical (weights, metrics,
predictions, log). The reloaded model (load_finetuned) must reproduce the recorded test predictions. The
cases cover every method with both families and every quantization with both families. QLoRA is also
SIGKILLed in a subprocess. AdaLoRA runs leave their rank allocation, which reads into a DataFrame and draws.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructblip_peft import checkpoint as ckpt
from instructblip_peft.artifacts import ADALORA_RANKS, ADALORA_RANKS_FIGURE
from instructblip_peft.finetuned import load_finetuned
from instructblip_peft.data.records import load_split
from instructblip_peft.evaluate import evaluate
from instructblip_peft.train import train


from train_fixtures import FAST, SINGLE_THREAD_ENV, assert_same_run, final_state, make_colour_dataset

# 2 epochs x 2 steps; a checkpoint after every step. AdaLoRA (4 steps): no warm-up, final allocation at step 3.
SETTINGS = dict(FAST, max_train_samples=8, max_eval_samples=6, checkpoint_every_steps=1, learning_rate=1e-2)
# (method, family, quantize): each method with both families, each quantization with both families.
CASES = [("lora", "t5", "none"), ("lora", "llama", "4bit"),
         ("dora", "t5", "8bit"), ("dora", "llama", "none"),
         ("rslora", "t5", "4bit"), ("rslora", "llama", "8bit"),
         ("adalora", "t5", "none"), ("adalora", "llama", "4bit"),
         ("ia3", "t5", "4bit"), ("ia3", "llama", "8bit")]
EXPERIMENT = {"t5": "31", "llama": "63"}
IA3_EXPERIMENT = {"t5": "29", "llama": "61"}   # IA3 has no rank: Q-Former+LLM is one run, its rank-1 ID


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("processed"))


def run(out, data, method, family, quantize, **kw):
    exp = (IA3_EXPERIMENT if method == "ia3" else EXPERIMENT)[family]
    return train("scienceqa", exp, out, dataset_dir=data, preset="tiny", progress=False,
                 **dict(SETTINGS, peft_method=method, quantize=quantize), **kw)


def killed_after_checkpoint(monkeypatch, n: int):
    """Make the n-th checkpoint write the last thing the run does (as a kill right after it would)."""
    real, calls = ckpt.save_checkpoint, {"n": 0}

    def save(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed()
    monkeypatch.setattr(ckpt, "save_checkpoint", save)


@pytest.mark.parametrize("method,family,quantize", CASES, ids=["-".join(c) for c in CASES])
def test_trains_resumes_exactly_and_reloads(method, family, quantize, data, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    metrics = run(whole, data, method, family, quantize)
    assert metrics["peft_method"] == method and metrics["quantize"] == quantize
    assert metrics["rank"] == (None if method == "ia3" else 4)
    assert metrics["lora_params"] > 0
    # Interrupted after step 3's checkpoint (epoch 2, mid-epoch; for AdaLoRA, its final allocation).
    with monkeypatch.context() as m:
        killed_after_checkpoint(m, 4)  # steps 1, 2, epoch 1's end, step 3
        with pytest.raises(Killed):
            run(parts, data, method, family, quantize)
    assert not (parts / "metrics.json").exists()
    run(parts, data, method, family, quantize)
    assert_same_run(final_state(parts), final_state(whole))

    model, processor, info = load_finetuned(whole)
    records, root = load_split(data, "test")
    result = evaluate(model, processor, records[:SETTINGS["max_eval_samples"]], root, "scienceqa", info["settings"],
                      family, progress=False)
    recorded = [json.loads(line) for line in (whole / "predictions_test.jsonl").read_text().splitlines()]
    assert result.predictions == recorded
    assert result.accuracy == metrics["test_accuracy"]
    if method == "adalora":
        assert (parts / ADALORA_RANKS).read_text() == (whole / ADALORA_RANKS).read_text()


# ---------------------------------------------------------------- QLoRA killed for real

TRAIN_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import train_fixtures  # single-threaded like the test process
from instructblip_peft.train import train
train("scienceqa", sys.argv[2], sys.argv[3], dataset_dir=sys.argv[4], preset="tiny", progress=False,
      **json.loads(sys.argv[5]))
"""


def test_qlora_killed_mid_epoch_resumes_to_the_same_end(data, tmp_path):
    settings = dict(SETTINGS, max_train_samples=16, epochs=2, peft_method="lora", quantize="4bit")
    whole = tmp_path / "whole"
    train("scienceqa", "63", whole, dataset_dir=data, preset="tiny", progress=False, **settings)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(Path(__file__).parent), "63", str(out), str(data),
                             json.dumps(settings)], env={**os.environ, **SINGLE_THREAD_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                state = json.loads((out / "checkpoint" / "state.json").read_text())
            except (OSError, ValueError):
                state = None
            if state and state["global_step"] >= 6 and state["iterations_in_epoch"] > 0:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert not (out / "metrics.json").exists()
    train("scienceqa", "63", out, dataset_dir=data, preset="tiny", progress=False, **settings)
    assert_same_run(final_state(out), final_state(whole))


# ---------------------------------------------------------------- the sublayer-importance analysis

def test_adalora_ranks_read_into_a_tidy_frame_and_draw(data, tmp_path):
    from instructblip_peft.importance import (QFORMER_SUBLAYERS, collect_adalora_ranks, importance_figure, llm_share,
                                              qformer_grid, read_adalora_ranks)

    out = tmp_path / "scienceqa" / "63+adalora"
    run(out, data, "adalora", "llama", "none", adalora_tfinal=0.25)
    saved = json.loads((out / ADALORA_RANKS).read_text())
    assert saved["allocation"] == "final" and saved["init_rank"] == 6 and saved["target_rank"] == 4
    df = read_adalora_ranks(out)
    assert (out / ADALORA_RANKS_FIGURE).stat().st_size > 10_000
    # One row per adapted module: 2 Q-Former layers (cross-attention in layer 0 only) and 2 LLaMA layers.
    assert len(df) == 2 * (2 + 4) + 4 + 2 * 5
    assert set(df["component"]) == {"qformer", "llm"}
    assert set(df.loc[df.component == "qformer", "sublayer"]) == {label for label, _ in QFORMER_SUBLAYERS}
    # The budget: the average final rank is the target; the sum of kept triplets matches each module's rank.
    assert df["rank"].mean() == pytest.approx(4, abs=0.5)
    assert all(sum(m["kept"]) == m["rank"] for m in saved["modules"].values())
    assert df["importance"].notna().all() and (df["importance"] >= 0).all()
    assert 0 < llm_share(df) < 1
    grid = qformer_grid(df)
    assert grid.shape == (2, 10) and grid.isna().sum().sum() == 4  # layer 1 has no cross-attention
    assert list(collect_adalora_ranks(tmp_path)["run"].unique()) == ["63+adalora"]
    fig = importance_figure(df, tmp_path / "fig.png")
    assert len(fig.axes) >= 3 and (tmp_path / "fig.png").is_file()

"""Every peft method learns the bundled sample from its images, like LoRA in test_learning.py.

A Q-Former+LLM run of each method beyond LoRA (DoRA, rsLoRA, AdaLoRA at rank 4; IA3, which has no rank, at
the group's rank-1 ID) must clearly beat the untrained model, and fall back to about chance with blank images.
To keep the suite short each method runs once, the families alternating (LoRA itself runs with both in
test_learning.py), with the tiny presets' recipe (10 epochs; IA3 at its own learning rate, presets.yaml
`method_train`). The README's table has every method with both families.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # minutes of CPU: `make test-slow` (CI runs it too)

import train_fixtures  # noqa: F401  (one thread: tiny models on a shared CPU)
from instructblip_peft.finetuned import load_finetuned
from instructblip_peft.data.records import load_split
from instructblip_peft.evaluate import evaluate
from instructblip_peft.train import train

ZEROSHOT = {"t5": "zeroshot-flant5xl", "llama": "zeroshot-vicuna7b"}
# method -> (family, experiment)
CASES = {"dora": ("t5", "31"), "rslora": ("llama", "63"), "adalora": ("t5", "31"), "ia3": ("t5", "29")}


@pytest.fixture(scope="module")
def untrained(sample_scienceqa, tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    return {f: train("scienceqa", z, root / z, dataset_dir=sample_scienceqa, preset="tiny", progress=False)
            for f, z in ZEROSHOT.items()}


@pytest.mark.parametrize("method", list(CASES))
def test_each_method_learns_from_the_pictures(method, sample_scienceqa, untrained, tmp_path):
    family, experiment = CASES[method]
    before = untrained[family]
    after = train("scienceqa", experiment, tmp_path, dataset_dir=sample_scienceqa, preset="tiny", progress=False,
                  peft_method=method)
    assert after["val_accuracy"] >= before["val_accuracy"] + 0.15, (before["val_accuracy"], after["val_accuracy"])
    assert after["test_accuracy"] >= before["test_accuracy"] + 0.15, (before["test_accuracy"], after["test_accuracy"])
    model, processor, info = load_finetuned(tmp_path)
    records, image_root = load_split(sample_scienceqa, "test")
    chance = sum(1 / len(r["choices"]) for r in records) / len(records)
    blank = [dict(r, image=None) for r in records]
    result = evaluate(model, processor, blank, image_root, "scienceqa", info["settings"], family, progress=False)
    assert abs(result.accuracy - chance) <= 0.12, (result.accuracy, chance)

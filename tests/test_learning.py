"""The tiny presets genuinely learn the bundled sample from its images.

A Q-Former+LLM LoRA run (experiments 31 and 63: the tiny FlanT5 and Vicuna stand-ins) on the generated ScienceQA sample must beat the
same untrained model (its zero-shot baseline) by at least 20 points, and fall back to about chance when its
images are blanked: the gain comes from reading the pictures, not from memorising the text.
"""
from __future__ import annotations

import pytest

import train_fixtures  # noqa: F401  (one thread: tiny models on a shared CPU)
from instructblip_peft.finetuned import load_finetuned
from instructblip_peft.data.records import load_split
from instructblip_peft.evaluate import evaluate
from instructblip_peft.train import train


# Q-Former+LLM LoRA, rank 4, for each LLM family, against the same untrained model.
FAMILIES = {"t5": ("31", "zeroshot-flant5xl"), "llama": ("63", "zeroshot-vicuna7b")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def learned(request, sample_scienceqa, tmp_path_factory):
    experiment, zeroshot = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    untrained = train("scienceqa", zeroshot, root / "zeroshot", dataset_dir=sample_scienceqa, preset="tiny",
                      progress=False)
    trained = train("scienceqa", experiment, root / experiment, dataset_dir=sample_scienceqa, preset="tiny",
                    progress=False)
    return {"processed": sample_scienceqa, "run": root / experiment, "untrained": untrained, "trained": trained,
            "family": request.param}


def test_training_beats_the_untrained_model_by_20_points(learned):
    before, after = learned["untrained"], learned["trained"]
    assert after["val_accuracy"] >= before["val_accuracy"] + 0.20, (before["val_accuracy"], after["val_accuracy"])
    assert after["test_accuracy"] >= before["test_accuracy"] + 0.20, (before["test_accuracy"], after["test_accuracy"])


def test_with_blank_images_the_trained_model_is_back_to_chance(learned):
    model, processor, info = load_finetuned(learned["run"])
    records, image_root = load_split(learned["processed"], "test")
    chance = sum(1 / len(r["choices"]) for r in records) / len(records)
    blank = [dict(r, image=None) for r in records]  # no image file: a blank picture of the right size
    result = evaluate(model, processor, blank, image_root, "scienceqa", info["settings"], learned["family"],
                      progress=False)
    assert abs(result.accuracy - chance) <= 0.12, (result.accuracy, chance)
    assert result.accuracy <= learned["trained"]["test_accuracy"] - 0.15

"""Every precision mode on CPU, with the dtype mix a GPU run has: fp32, and bf16 (bf16 base weights, fp32
trained tensors, CPU autocast), for both LLM families: train, stop and resume, load_finetuned, evaluate
(rank and generate). fp16 once, where the CPU runs it; impossible combinations are one clear error."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructblip_peft import model as model_module
from instructblip_peft.config import Settings
from instructblip_peft.data.records import load_split
from instructblip_peft.errors import UserError
from instructblip_peft.evaluate import evaluate
from instructblip_peft.finetuned import load_finetuned
from instructblip_peft.lora import base_model, trainable_parameters
from instructblip_peft.train import train

from train_fixtures import (FAST, Stopped, assert_same_run, final_state, make_colour_dataset,
                            stop_after_checkpoint)

EXPERIMENT = {"t5": "31", "llama": "63"}  # Q-Former + LLM LoRA: LoRA on both sides, the Q-Former's dropout
MATRIX = [("t5", "no"), ("t5", "bf16"), ("llama", "no"), ("llama", "bf16")]
DTYPE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Two epochs of two steps, a checkpoint after every step.
BASE = dict(FAST, epochs=2, max_train_samples=8, max_eval_samples=4, checkpoint_every_steps=1, learning_rate=1e-2)


def settings_for(mixed_precision: str) -> dict:
    # The half-precision runs keep none of their vision cache in RAM: all of it goes through the spill file.
    return dict(BASE, mixed_precision=mixed_precision,
                eval_vision_cache_ram_gb=0.0 if mixed_precision != "no" else 2.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("processed"))


@pytest.fixture(scope="module", params=MATRIX, ids=[f"{f}-{'fp32' if m == 'no' else m}" for f, m in MATRIX])
def finished(request, data, tmp_path_factory):
    family, mixed_precision = request.param
    out = tmp_path_factory.mktemp(f"{family}-{mixed_precision}")
    metrics = train("scienceqa", EXPERIMENT[family], out, dataset_dir=data, preset="tiny", progress=False,
                    **settings_for(mixed_precision))
    return family, mixed_precision, out, metrics


def recorded(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"predictions_{split}.jsonl").read_text().splitlines()]


def test_trains_in_the_dtype_mix_asked_for(finished):
    family, mixed_precision, out, metrics = finished
    assert metrics["status"] == "finished" and metrics["global_steps"] == 4
    assert all(math.isfinite(h["train_loss"]) for h in metrics["history"])
    run = json.loads((out / "run.json").read_text())
    assert run["precision"] == {"mixed_precision": mixed_precision,
                                "model_dtype": str(DTYPE[mixed_precision]).removeprefix("torch.")}
    # Trained tensors are kept and saved in fp32 whatever the base weights are.
    for name in ("trained_tensors.safetensors", "checkpoint/trainable.safetensors"):
        assert {t.dtype for t in load_file(out / name).values()} == {torch.float32}
    assert {t.dtype for t in load_file(out / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}
    # The vision cache is stored as evaluation uses it (the model's dtype); its spill file is gone.
    cache = metrics["eval_vision_cache"]
    assert cache["images"] == 4
    assert cache["bytes_per_image"] == 17 * 64 * DTYPE[mixed_precision].itemsize  # (16 patches + CLS) x 64 values
    assert (cache["spilled_bytes"] > 0) == (mixed_precision != "no")
    assert not list(out.glob("eval_vision_cache*"))


def test_stopped_and_resumed_run_ends_like_the_uninterrupted_one(finished, data, tmp_path, monkeypatch):
    family, mixed_precision, out, _ = finished
    # A stop right after a complete checkpoint stands for a kill (test_resume and test_hardening SIGKILL for real).
    with monkeypatch.context() as m:
        # After step 3: in the middle of epoch 2 (checkpoints: step 1, step 2 = epoch 1's end, step 3).
        stop_after_checkpoint(m, 3)
        with pytest.raises(Stopped):
            train("scienceqa", EXPERIMENT[family], tmp_path, dataset_dir=data, preset="tiny", progress=False,
                  **settings_for(mixed_precision))
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["iterations_in_epoch"], state["global_step"]) == (1, 1, 3)
    train("scienceqa", EXPERIMENT[family], tmp_path, dataset_dir=data, preset="tiny", progress=False,
          **settings_for(mixed_precision))
    assert_same_run(final_state(tmp_path), final_state(out))


def test_load_finetuned_reproduces_the_recorded_predictions(finished, data):
    """In the dtype the run used, without any autocast by the caller: evaluate() applies it itself."""
    family, mixed_precision, out, metrics = finished
    model, processor, info = load_finetuned(out)
    base = base_model(model)
    assert base.language_model.get_input_embeddings().weight.dtype == DTYPE[mixed_precision]
    assert base.vision_model.embeddings.patch_embedding.weight.dtype == DTYPE[mixed_precision]
    assert {p.dtype for n, p in base.named_parameters() if "lora_" in n} == {torch.float32}
    assert base.query_tokens.dtype == torch.float32
    for split in ("val", "test"):
        records, root = load_split(data, split)
        result = evaluate(model, processor, records, root, "scienceqa", info["settings"], family, progress=False)
        assert result.predictions == recorded(out, split)
        assert result.accuracy == metrics[f"{split}_accuracy"]


def test_evaluate_generates_in_every_dtype_mix(finished, data):
    family, mixed_precision, out, _ = finished
    model, processor, info = load_finetuned(out)
    records, root = load_split(data, "val")
    settings = Settings(info["settings"], eval_mode="generate", max_output_txt_len=4)
    result = evaluate(model, processor, records, root, "scienceqa", settings, family, progress=False)
    assert len(result.predictions) == 4
    assert all(isinstance(p["generated"], str) and p["predicted"] in (-1, 0, 1) for p in result.predictions)


def test_other_dtypes_than_the_runs_work_too(finished, data):
    """A bf16 run evaluated in fp32 and an fp32 run in bf16 (a GPU's choice): no dtype error, and the
    predictions of this easy question set barely move."""
    family, mixed_precision, out, _ = finished
    other = torch.float32 if mixed_precision == "bf16" else torch.bfloat16
    model, processor, info = load_finetuned(out, dtype=other)
    assert base_model(model).vision_model.embeddings.patch_embedding.weight.dtype == other
    assert {p.dtype for p in trainable_parameters(model).values()} <= {torch.float32}
    records, root = load_split(data, "test")
    result = evaluate(model, processor, records, root, "scienceqa", info["settings"], family, progress=False)
    scores = [p["scores"] for p in result.predictions]
    for got, want in zip(scores, (p["scores"] for p in recorded(out, "test"))):
        assert got == pytest.approx(want, rel=0.05)


def test_fp16_runs_on_a_cpu_that_supports_it(data, tmp_path):
    if not model_module.cpu_supports_fp16():
        pytest.skip("this CPU's PyTorch has no fp16 autocast")
    metrics = train("scienceqa", "31", tmp_path, dataset_dir=data, preset="tiny", progress=False,
                    **dict(settings_for("fp16"), epochs=1))
    assert metrics["status"] == "finished"
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["scaler"]["scale"] > 0  # loss scaling, as on a GPU
    model, processor, info = load_finetuned(tmp_path)
    assert base_model(model).vision_model.embeddings.patch_embedding.weight.dtype == torch.float16
    records, root = load_split(data, "test")
    result = evaluate(model, processor, records, root, "scienceqa", info["settings"], "t5", progress=False)
    assert result.predictions == recorded(tmp_path, "test")


@pytest.mark.parametrize("settings, message", [
    ({"mixed_precision": "no", "model_dtype": "bfloat16"}, "model_dtype' bfloat16 needs mixed_precision bf16"),
    ({"mixed_precision": "bf16", "model_dtype": "float16"}, "model_dtype' float16 needs mixed_precision fp16"),
    ({"mixed_precision": "fp16"}, "fp16: this CPU's PyTorch cannot run fp16"),
])
def test_impossible_precision_is_one_error_before_anything_is_written(settings, message, data, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(model_module, "cpu_supports_fp16", lambda: False)  # a CPU build without fp16 autocast
    with pytest.raises(UserError, match=message):
        train("scienceqa", "31", tmp_path / "run", dataset_dir=data, preset="tiny", progress=False,
              **dict(BASE, **settings))
    assert not (tmp_path / "run").exists()


def test_mixed_precision_no_is_a_word_not_false():
    """YAML reads `no` as false; `-p mixed_precision no` (the NaN message's advice) must still mean 'no'."""
    from instructblip_peft.config import resolve_settings
    assert resolve_settings(overrides={"mixed_precision": "no"}).mixed_precision == "no"
    assert resolve_settings(overrides={"num_workers": "2"}).num_workers == 2
    with pytest.raises(UserError, match="'num_workers' must be 'auto' or an integer >= 0"):
        resolve_settings(overrides={"num_workers": "-1"})

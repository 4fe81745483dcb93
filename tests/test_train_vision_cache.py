"""Training reuses the frozen ViT (train_vision_cache, vision_reuse.py): with images not augmented (the tiny
presets' default), each image's ViT output is kept from the first epoch and the ViT is skipped after it. The
run must be the one it would be without the cache: same losses, weights, predictions, also after a resume."""
import json

import pytest

from instructblip_peft import evaluate as evaluation
from instructblip_peft import train as train_module
from instructblip_peft.train import train

from train_fixtures import EXPERIMENT, SETTINGS, Stopped, assert_same_run, final_state, stop_after_checkpoint

# Fixtures from conftest.py: data (the processed colour dataset), uninterrupted (final_state of EXPERIMENT
# with SETTINGS: the tiny preset does not augment, so that run used the cache).
LLAMA_EXPERIMENT = "63"  # Q-Former + LLM LoRA with the LLaMA family


def run(data, out, experiment=EXPERIMENT, **overrides) -> dict:
    return train("scienceqa", experiment, out, dataset_dir=data, preset="tiny", progress=False,
                 **{**SETTINGS, **overrides})


@pytest.mark.parametrize("family,checkpointing", [("t5", False), ("llama", False), ("t5", True)],
                         ids=["t5", "llama", "t5-gradient-checkpointing"])
def test_the_cache_changes_nothing_in_the_run(data, uninterrupted, tmp_path, family, checkpointing):
    experiment = EXPERIMENT if family == "t5" else LLAMA_EXPERIMENT
    if family == "t5" and not checkpointing:
        cached, cached_metrics = uninterrupted, None
    else:
        cached_metrics = run(data, tmp_path / "cached", experiment, gradient_checkpointing=checkpointing)
        cached = final_state(tmp_path / "cached")
    plain_metrics = run(data, tmp_path / "plain", experiment, train_vision_cache=False,
                        gradient_checkpointing=checkpointing)
    assert plain_metrics["train_vision_cache"] is None
    # Every logged loss, the last and best weights, the adapter, predictions and curves: bit for bit.
    assert_same_run(final_state(tmp_path / "plain"), cached)
    if cached_metrics is not None:
        stats = cached_metrics["train_vision_cache"]
        assert stats["images"] == 4 and stats["reused_batches"] > stats["vit_batches"] > 0
        assert not list((tmp_path / "cached").glob("train_vision_cache*"))  # deleted with the run


def test_the_vit_runs_only_in_the_first_epoch(data, tmp_path, monkeypatch):
    """Calls of the ViT's encoder per epoch during training (evaluation's own calls not counted)."""
    calls: list[list[int]] = []   # calls[epoch][i]: batch size of each training call of the encoder
    evaluating = [False]
    real_load, real_evaluate = train_module.load_model, evaluation.evaluate

    def load_model(*args, **kwargs):
        model, processor = real_load(*args, **kwargs)
        model.vision_model.encoder.register_forward_hook(
            lambda _m, _a, out: None if evaluating[0] else calls[-1].append(len(out[0])))
        return model, processor

    def evaluate(*args, **kwargs):
        evaluating[0] = True
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            evaluating[0] = False
            calls.append([])  # val is evaluated at each epoch's end: what follows is the next epoch

    monkeypatch.setattr(train_module, "load_model", load_model)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    per_epoch = {}
    for cache in (True, False):
        calls[:] = [[]]
        run(data, tmp_path / str(cache), train_vision_cache=cache)
        per_epoch[cache] = calls[: SETTINGS["epochs"]]
    batches = SETTINGS["max_train_samples"] // SETTINGS["batch_size"]
    assert per_epoch[False] == [[SETTINGS["batch_size"]] * batches] * SETTINGS["epochs"]
    # With the cache: only batches holding an image not seen yet (the colour dataset has 4 images), and only
    # in the first epoch.
    assert 1 <= len(per_epoch[True][0]) <= batches
    assert per_epoch[True][1:] == [[]] * (SETTINGS["epochs"] - 1)


def test_stopped_and_resumed_with_the_cache_equals_an_uninterrupted_run(data, uninterrupted, tmp_path, monkeypatch):
    """Stopped mid-epoch 2 (after the checkpoint at step 6), with the whole cache in its spill file (RAM cap 0);
    a spill file of garbage left where the killed run's was: the resumed session starts its cache empty, never
    reads that file, and ends exactly like the uninterrupted run."""
    with monkeypatch.context() as m:
        stop_after_checkpoint(m, 3)  # checkpoints at steps 2, 4 (epoch 1's end), 6
        with pytest.raises(Stopped):
            run(data, tmp_path, train_vision_cache_ram_gb=0.0)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["global_step"] == 6 and state["iterations_in_epoch"] > 0
    (tmp_path / "train_vision_cache.0.bin").write_bytes(b"\x7f" * 2**20)
    metrics = run(data, tmp_path, train_vision_cache_ram_gb=0.0)
    stats = metrics["train_vision_cache"]
    assert stats["ram_bytes"] == 0 and stats["spilled_bytes"] > 0 and stats["vit_batches"] >= 1
    assert_same_run(final_state(tmp_path), uninterrupted)
    assert not (tmp_path / "train_vision_cache.0.bin").exists()


def test_augmented_images_switch_the_cache_off_with_one_message(data, tmp_path, capsys):
    metrics = train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=True,
                    **{**SETTINGS, "epochs": 2, "max_train_samples": 8, "augment": True})
    said = capsys.readouterr().out
    assert said.count("train_vision_cache:") == 1 and "augment" in said
    assert "augment" in metrics["train_vision_cache"]["off"]

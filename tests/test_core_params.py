"""params/ is the single source of truth: the recipe per experiment and dataset, and strict validation."""
import shutil

import pytest

from instructblip_peft.config import resolve_settings, validate_overrides
from instructblip_peft.errors import UserError
from instructblip_peft.experiments import get_experiment
from instructblip_peft.model import load_preset, preset_for


@pytest.mark.parametrize("dataset,exp,lr", [
    ("scienceqa", "1", 2e-5), ("scienceqa", "15", 5e-4), ("scienceqa", "19", 1e-4), ("scienceqa", "30", 5e-4),
    ("scienceqa", "64", 5e-4), ("scienceqa", "61", 1e-4), ("scienceqa", "33", 2e-5),
    ("iconqa", "5", 1e-5), ("iconqa", "15", 1e-4), ("iconqa", "33", 1e-5), ("iconqa", "32", 5e-4),
    ("iconqa", "19", 5e-4), ("iconqa", "44", 2e-5),
])
def test_learning_rates_follow_the_original_configs(dataset, exp, lr):
    assert get_experiment(exp).learning_rate(dataset) == pytest.approx(lr)


def test_recipe_defaults():
    s = resolve_settings("iconqa", get_experiment("38"), load_preset("vicuna7b"))
    assert (s.epochs, s.batch_size, s.grad_accum_steps, s.seed) == (10, 8, 2, 42)
    s = resolve_settings("scienceqa", get_experiment("38"), load_preset("vicuna7b"))
    assert s.epochs == 15 and s.weight_decay == 0.05 and (s.adam_beta1, s.adam_beta2) == (0.9, 0.999)
    s = resolve_settings("scienceqa", get_experiment("6"), load_preset("flant5xl"))
    assert (s.batch_size, s.grad_accum_steps, s.max_txt_len, s.max_output_txt_len, s.image_size) == (16, 1, 128, 256, 224)
    assert s.early_stopping_patience == 3


def test_user_overrides_win_and_are_typed():
    s = resolve_settings("scienceqa", get_experiment("15"), load_preset("tiny-t5"),
                         {"learning_rate": "1e-4", "epochs": "2", "augment": "false"})
    assert s.learning_rate == 1e-4 and s.epochs == 2 and s.augment is False


@pytest.mark.parametrize("overrides,message", [
    ({"learnign_rate": 1e-4}, "unknown setting 'learnign_rate'"),
    ({"epochs": "two"}, "setting 'epochs' must be int"),
    ({"epochs": 0}, "'epochs' must be positive"),
    ({"augment": "maybe"}, "'augment' must be bool"),
    ({"mixed_precision": "fp8"}, "must be one of"),
])
def test_bad_overrides_are_one_clear_error(overrides, message):
    with pytest.raises(UserError, match=message):
        validate_overrides(overrides)


def test_unknown_preset_and_family_mismatch():
    with pytest.raises(UserError, match="unknown preset 'tiny-gpt'.*tiny-t5"):
        load_preset("tiny-gpt")
    with pytest.raises(UserError, match="preset 'tiny-llama' is a llama model"):
        preset_for(get_experiment("15"), "tiny-llama")
    assert preset_for(get_experiment("15"), "tiny")["name"] == "tiny-t5"
    assert preset_for(get_experiment("64"), None)["name"] == "vicuna7b"


@pytest.fixture
def edited_params(tmp_path, monkeypatch):
    from instructblip_peft import config, experiments
    dst = tmp_path / "params"
    shutil.copytree(config.params_dir(), dst)
    monkeypatch.setenv("INSTRUCTBLIP_PEFT_PARAMS", str(dst))
    experiments._spec.cache_clear(), experiments.registry.cache_clear()
    yield dst
    experiments._spec.cache_clear(), experiments.registry.cache_clear()


def test_invalid_yaml_names_the_file(edited_params):
    (edited_params / "train.yaml").write_text("seed: [42\n")
    with pytest.raises(UserError, match=r"train\.yaml: not valid YAML"):
        resolve_settings()


def test_unknown_key_in_a_preset_is_an_error(edited_params):
    text = (edited_params / "presets.yaml").read_text().replace("train: {batch_size: 16, grad_accum_steps: 1}",
                                                                 "train: {batch_size: 16, grad_acum_steps: 1}", 1)
    (edited_params / "presets.yaml").write_text(text)
    with pytest.raises(UserError, match="unknown key 'grad_acum_steps'"):
        resolve_settings("scienceqa", get_experiment("1"), load_preset("flant5xl"))


@pytest.mark.parametrize("old,new,message", [
    ("ranks: [1, 2, 4, 8]", "ranks: [0, 2, 4, 8]", "rank must be a positive integer"),
])
def test_rank_must_be_positive(edited_params, old, new, message):
    from instructblip_peft.lora import apply_experiment
    from instructblip_peft.model import meta_model
    path = edited_params / "experiments.yaml"
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(UserError, match=message):
        apply_experiment(meta_model("flant5xl"), get_experiment("1"))

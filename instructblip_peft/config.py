"""Reading params/: the single source of truth for every setting.

`resolve_settings` merges, in order of precedence (last wins):
train.yaml + data.yaml defaults < the experiment's recipe (learning rate, epochs)
< the preset's values (per-LLM batch size; the tiny presets' own overrides) < the user's overrides.
Unknown keys and wrongly typed values are errors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def params_dir() -> Path:
    """params/ beside the package; INSTRUCTBLIP_PEFT_PARAMS points elsewhere (e.g. an edited copy)."""
    return Path(os.environ.get("INSTRUCTBLIP_PEFT_PARAMS", REPO_DIR / "params"))


def load_yaml(name: str) -> dict:
    path = params_dir() / name
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- model presets (presets.yaml)
# Here rather than in model.py, so that planning a run (the CLI, the runner) needs no torch.

def load_preset(name: str) -> dict:
    presets = load_yaml("presets.yaml")
    if name not in presets:
        raise UserError(f"unknown preset '{name}'. Valid presets: {', '.join(presets)}")
    return {"name": name, **presets[name]}


def preset_names() -> list[str]:
    return list(load_yaml("presets.yaml"))


def preset_for(experiment, preset: str | None) -> dict:
    """The preset to run `experiment` with. None/'auto': the real model of its LLM; 'tiny': the
    miniature of its family. A preset of the other LLM family is an error."""
    presets = load_yaml("presets.yaml")
    if preset in (None, "", "auto"):
        name = next(n for n, p in presets.items() if p.get("llm") == experiment.llm and "source" in p)
    elif preset == "tiny":
        name = next(n for n, p in presets.items() if p.get("family") == experiment.family and "tiny" in p)
    else:
        name = preset
    p = load_preset(name)
    if p["family"] != experiment.family:
        raise UserError(f"experiment {experiment.id} uses {experiment.llm} ({experiment.family}); preset "
                        f"'{name}' is a {p['family']} model. Use a {experiment.family} preset or 'tiny'/'auto'.")
    return p


# Settings whose default is null still have a type; it is declared here once rather than guessed.
NULLABLE_TYPES = {
    "epochs": int, "learning_rate": float, "batch_size": int, "grad_accum_steps": int,
    "max_steps": int, "max_train_samples": int, "max_eval_samples": int, "max_grad_norm": float,
}
CHOICES = {
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "eval_mode": ("rank", "generate"),
    "lr_schedule": ("linear_per_epoch",),
}
POSITIVE = {"epochs", "learning_rate", "batch_size", "grad_accum_steps", "eval_batch_size", "max_steps",
            "image_size", "max_txt_len", "max_output_txt_len", "checkpoint_every_steps", "log_every_steps",
            "max_train_samples", "max_eval_samples"}


def default_settings() -> dict:
    """Every overridable setting with its default (train.yaml and data.yaml minus prompt templates)."""
    train = load_yaml("train.yaml")
    data = {k: v for k, v in load_yaml("data.yaml").items() if k != "templates"}
    clash = set(train) & set(data)
    if clash:
        raise UserError(f"params: keys defined twice (train.yaml and data.yaml): {sorted(clash)}")
    return {**train, **data}


def parse_value(text: str) -> Any:
    """A CLI string as YAML would read it ("1e-4" -> float, "true" -> bool, "null" -> None)."""
    if not isinstance(text, str):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-4" as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_value(key: str, value: Any, default: Any) -> Any:
    """Return `value` coerced to the setting's type, or raise a UserError naming the key."""
    expected = NULLABLE_TYPES.get(key) or (type(default) if default is not None else None)
    if value is None:
        if key in NULLABLE_TYPES or default is None:
            return None
        raise UserError(f"setting '{key}' cannot be null (expected {expected.__name__})")
    ok = True
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is str:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"setting '{key}' must be {expected.__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"setting '{key}' must be one of {list(CHOICES[key])}, got {value!r}")
    if key in POSITIVE and value <= 0:
        raise UserError(f"setting '{key}' must be positive, got {value!r}")
    return value


def validate_overrides(overrides: Mapping[str, Any] | None, defaults: dict | None = None) -> dict:
    defaults = default_settings() if defaults is None else defaults
    out = {}
    for key, raw in (overrides or {}).items():
        if key not in defaults:
            raise UserError(f"unknown setting '{key}'. Valid settings: {', '.join(sorted(defaults))}")
        out[key] = check_value(key, parse_value(raw), defaults[key])
    return out


class Settings(dict):
    """A resolved set of settings: a dict that also reads as attributes (settings.learning_rate)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def resolve_settings(dataset: str | None = None, experiment=None, preset: Mapping | None = None,
                     overrides: Mapping[str, Any] | None = None) -> Settings:
    defaults = default_settings()
    merged = dict(defaults)
    if experiment is not None and dataset is not None:
        merged["learning_rate"] = experiment.learning_rate(dataset)
        merged["epochs"] = experiment.epochs(dataset)
    if preset is not None:
        for section in ("train", "data"):
            for key, value in (preset.get(section) or {}).items():
                if key not in defaults:
                    raise UserError(f"presets.yaml: preset '{preset['name']}' sets unknown key '{key}'")
                merged[key] = check_value(key, value, defaults[key])
    merged.update(validate_overrides(overrides, defaults))
    return Settings(merged)


def work_dir() -> Path:
    """What relative paths of params/paths.yaml are relative to: the repository root, or
    INSTRUCTBLIP_PEFT_WORKDIR (the test suite points it at a temporary directory, so executing the notebooks
    with their defaults never touches a user's data/ or outputs/)."""
    return Path(os.environ.get("INSTRUCTBLIP_PEFT_WORKDIR") or REPO_DIR)


def path_setting(key: str) -> Path:
    """A path from params/paths.yaml, resolved against work_dir()."""
    paths = load_yaml("paths.yaml")
    if key not in paths:
        raise UserError(f"paths.yaml: no key '{key}' (have: {', '.join(paths)})")
    p = Path(os.path.expanduser(str(paths[key])))
    return p if p.is_absolute() else work_dir() / p


def outputs_root(outputs_dir: str | os.PathLike | None = None) -> Path:
    """Where runs go: `outputs_dir` when given, else paths.yaml's."""
    return Path(outputs_dir).expanduser().resolve() if outputs_dir else path_setting("outputs_dir")


def processed_root(processed_dir: str | os.PathLike | None = None) -> Path:
    """Where processed datasets go (one folder per dataset inside): `processed_dir` when given, else paths.yaml's."""
    return Path(processed_dir).expanduser().resolve() if processed_dir else path_setting("processed_dir")


def dataset_dir(dataset: str, processed_dir: str | os.PathLike | None = None) -> Path:
    """One processed dataset: <processed>/<dataset>/."""
    return processed_root(processed_dir) / dataset


def run_dir(dataset: str, experiment: str, outputs_dir: str | os.PathLike | None = None) -> Path:
    """One run: <outputs>/<dataset>/<experiment id>/ (artifacts.RunDir knows what is inside)."""
    return outputs_root(outputs_dir) / dataset / str(experiment)


def analysis_dir(outputs_dir: str | os.PathLike | None = None) -> Path:
    """<outputs>/<analysis_subdir of runner.yaml>/: the results table and figures."""
    return outputs_root(outputs_dir) / load_yaml("runner.yaml")["analysis_subdir"]


def demo_root(outputs_dir: str | os.PathLike | None = None) -> Path:
    """<outputs>/<demo outputs_subdir of runner.yaml>/: the demo's runs, apart from real ones."""
    return outputs_root(outputs_dir) / load_yaml("runner.yaml")["demo"]["outputs_subdir"]


def demo_processed_root(outputs_dir: str | os.PathLike | None = None) -> Path:
    """<outputs>/demo/<processed_subdir>/: the demo's processed sample, never over real processed data."""
    return demo_root(outputs_dir) / load_yaml("runner.yaml")["demo"]["processed_subdir"]

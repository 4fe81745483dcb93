"""Reading params/: the single source of truth for every setting.

`resolve_settings` merges, in order of precedence (last wins):
train.yaml + data.yaml defaults < the experiment's recipe (learning rate, epochs)
< the preset's values (per-LLM batch size; the tiny presets' own overrides, then those for the run's
peft_method under `method_train`) < the user's overrides.
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
PROJECT_MARKER = ".instructblip-peft"    # written by `instructblip-peft init` into the folder it fills
PARAMS_ENV = "INSTRUCTBLIP_PEFT_PARAMS"
WORKDIR_ENV = "INSTRUCTBLIP_PEFT_WORKDIR"


# ---------------------------------------------------------------- where params/ and notebooks/ come from
#
# 1. INSTRUCTBLIP_PEFT_PARAMS=DIR: params/ is DIR (notebooks/ as below).
# 2. A project folder: the working directory, or the nearest folder above it, holding the marker file that
#    `instructblip-peft init` writes; its params/ and notebooks/ are used.
# 3. The clone the package runs from (an editable install, or PYTHONPATH): its top-level params/, notebooks/.
# 4. The installed copy: instructblip_peft/params and instructblip_peft/notebooks inside a wheel's package.
# Relative paths of params/paths.yaml resolve against INSTRUCTBLIP_PEFT_WORKDIR, else the project folder (2),
# else the clone (3), else the working directory.

def project_dir(start: str | os.PathLike | None = None) -> Path | None:
    """The folder made by `instructblip-peft init` that holds `start` (default: the working directory)."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / PROJECT_MARKER).is_file():
            return d
    return None


def clone_dir() -> Path | None:
    """The clone the package runs from, or None when it runs from an installed wheel."""
    return REPO_DIR if (REPO_DIR / "pyproject.toml").is_file() and (REPO_DIR / "params").is_dir() else None


def shipped_dir() -> Path:
    """This install's own params/ and notebooks/: the clone's top level, else inside the installed package."""
    return clone_dir() or PACKAGE_DIR


def home_dir() -> Path:
    """The folder whose params/ and notebooks/ are used: a project folder (made by `init`), else shipped_dir()."""
    return project_dir() or shipped_dir()


def params_dir() -> Path:
    """params/ of home_dir(); INSTRUCTBLIP_PEFT_PARAMS points elsewhere (e.g. an edited copy)."""
    return Path(os.environ.get(PARAMS_ENV) or home_dir() / "params").expanduser().absolute()


def notebooks_dir() -> Path:
    return home_dir() / "notebooks"


def init_project(dest: str | os.PathLike = ".") -> Path:
    """`instructblip-peft init [DIR]`: copy this install's params/ and notebooks/ into DIR, to edit, and mark
    DIR as a project folder. Never overwrites; a failure leaves DIR as it was."""
    import shutil
    import tempfile

    dest = Path(dest).expanduser().absolute()
    source = shipped_dir()
    taken = [p for p in (dest / "params", dest / "notebooks", dest / PROJECT_MARKER) if p.exists()]
    if taken:
        raise UserError(f"{taken[0]} already exists: init never overwrites, choose an empty folder (or delete it)")
    created = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".init-", dir=dest))
        try:
            skip = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", "*.py", "*.pyc")
            for name in ("params", "notebooks"):
                shutil.copytree(source / name, work / name, ignore=skip)
            for name in ("params", "notebooks"):
                os.replace(work / name, dest / name)
                created.append(dest / name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        (dest / PROJECT_MARKER).write_text(
            "instructblip-peft project folder (written by `instructblip-peft init`). Whenever the package runs in\n"
            "this folder or below it, it reads params/ and notebooks/ here, and the relative paths of\n"
            "params/paths.yaml (data/, outputs/) are relative to this folder.\n")
    except OSError as e:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise UserError(f"cannot create a project folder in {dest}: {e.strerror or e}") from None
    return dest


def repository_url() -> str | None:
    """[project.urls] Repository of pyproject.toml: read from the clone, else from the installed metadata."""
    import re
    from importlib import metadata

    clone = clone_dir()
    if clone is not None:
        found = re.search(r'^Repository\s*=\s*"([^"]+)"', (clone / "pyproject.toml").read_text(), re.M)
        return found.group(1) if found else None
    try:
        urls = metadata.metadata("instructblip-peft").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    return next((u.split(",", 1)[1].strip() for u in urls if u.split(",", 1)[0].strip() == "Repository"), None)


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

PRESET_FIELDS = ("llm", "family", "source", "llm_source", "architecture", "train", "method_train", "data", "tiny")


def load_preset(name: str) -> dict:
    presets = load_yaml("presets.yaml")
    if name not in presets:
        raise UserError(f"unknown preset '{name}'. Valid presets: {', '.join(presets)}")
    preset = presets[name]
    if not isinstance(preset, dict):
        raise UserError(f"presets.yaml: preset '{name}' must be a mapping")
    unknown = [k for k in preset if k not in PRESET_FIELDS]
    if unknown:
        raise UserError(f"presets.yaml: preset '{name}' has unknown field '{unknown[0]}' "
                        f"(valid: {', '.join(PRESET_FIELDS)})")
    for key in ("source", "llm_source"):
        if preset.get(key) is not None and not (isinstance(preset[key], str) and preset[key].strip()):
            raise UserError(f"presets.yaml: preset '{name}': '{key}' must be a hub id or a directory, "
                            f"got {preset[key]!r}")
    return {"name": name, **preset}


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
    "eval_max_txt_len": int,
}
CHOICES = {
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "model_dtype": ("auto", "float32", "bfloat16", "float16"),
    "eval_mode": ("rank", "generate"),
    "lr_schedule": ("linear_per_epoch",),
    "peft_method": ("lora", "dora", "rslora", "adalora", "ia3"),
    "quantize": ("none", "4bit", "8bit"),
    "report_to": ("tensorboard", "wandb", "trackio", "mlflow", "none"),
}
POSITIVE = {"epochs", "learning_rate", "batch_size", "grad_accum_steps", "eval_batch_size", "max_steps",
            "image_size", "max_txt_len", "max_output_txt_len", "checkpoint_every_steps", "log_every_steps",
            "max_train_samples", "max_eval_samples", "lora_alpha", "adalora_delta_t", "eval_max_txt_len"}
NON_NEGATIVE = {"eval_vision_cache_ram_gb", "train_vision_cache_ram_gb", "num_workers", "adalora_orth_reg_weight"}
# Settings that must lie in [0, 1) (probabilities and fractions of a run).
FRACTIONS = {"lora_dropout", "adalora_tinit", "adalora_tfinal", "adalora_beta1", "adalora_beta2"}
# Settings that take "auto" or an integer.
AUTO_OR_INT = {"num_workers"}


# mixed_precision -> the half type it computes in (model_dtype's name for it).
HALF_TYPES = {"bf16": "bfloat16", "fp16": "float16"}


def check_precision(mixed_precision: str, model_dtype: str) -> None:
    """Half-precision base weights meet the fp32 trained tensors only under autocast of their own type.
    (mixed_precision 'auto' is checked once resolved on its device: model.resolve_precision.)"""
    if model_dtype not in HALF_TYPES.values() or mixed_precision == "auto":
        return
    if HALF_TYPES.get(mixed_precision) != model_dtype:
        need = next(k for k, v in HALF_TYPES.items() if v == model_dtype)
        raise UserError(f"setting 'model_dtype' {model_dtype} needs mixed_precision {need} (got {mixed_precision!r}): "
                        "half-precision weights meet the fp32 trained tensors only under autocast of the same type")


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
    if key in AUTO_OR_INT:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise UserError(f"setting '{key}' must be 'auto' or an integer >= 0, got {value!r}")
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
    if key in FRACTIONS and not 0 <= value < 1:
        raise UserError(f"setting '{key}' must be in [0, 1), got {value!r}")
    if key == "adalora_init_rank_factor" and value <= 1:
        raise UserError(f"setting '{key}' must be above 1 (AdaLoRA prunes from the initial rank down to the "
                        f"experiment's rank), got {value!r}")
    if key in NON_NEGATIVE and value < 0:
        raise UserError(f"setting '{key}' must be >= 0, got {value!r}")
    return value


def check_combination(settings: Mapping[str, Any]) -> None:
    """Constraints between settings (each value is already valid on its own)."""
    check_precision(settings.get("mixed_precision", "auto"), settings.get("model_dtype", "auto"))
    if settings.get("peft_method") == "adalora" and settings["adalora_tinit"] + settings["adalora_tfinal"] >= 1:
        raise UserError(f"settings 'adalora_tinit' + 'adalora_tfinal' must be below 1 (a fraction of the run is "
                        f"left for pruning ranks), got {settings['adalora_tinit']} + {settings['adalora_tfinal']}")
    if settings.get("quantize", "none") != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(f"setting 'quantize {settings['quantize']}' needs bitsandbytes: "
                            "pip install 'instructblip-peft[quant]' (or pip install bitsandbytes)") from None


def validate_overrides(overrides: Mapping[str, Any] | None, defaults: dict | None = None) -> dict:
    defaults = default_settings() if defaults is None else defaults
    out = {}
    for key, raw in (overrides or {}).items():
        if key not in defaults:
            raise UserError(f"unknown setting '{key}'. Valid settings: {', '.join(sorted(defaults))}")
        # A text setting keeps its text: YAML would read `-p mixed_precision no` as False.
        text = isinstance(raw, str) and isinstance(defaults[key], str) and key not in AUTO_OR_INT
        out[key] = check_value(key, raw if text else parse_value(raw), defaults[key])
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
    user = validate_overrides(overrides, defaults)
    if preset is not None:
        method = user.get("peft_method", merged["peft_method"])
        by_method = preset.get("method_train") or {}
        unknown = sorted(set(by_method) - set(CHOICES["peft_method"]))
        if unknown:
            raise UserError(f"presets.yaml: preset '{preset['name']}' has method_train for unknown method(s) {unknown}")
        for section in (preset.get("train"), preset.get("data"), by_method.get(method)):
            for key, value in (section or {}).items():
                if key not in defaults:
                    raise UserError(f"presets.yaml: preset '{preset['name']}' sets unknown key '{key}'")
                merged[key] = check_value(key, value, defaults[key])
    merged.update(user)
    check_combination(merged)
    return Settings(merged)


def work_dir() -> Path:
    """What relative paths of params/paths.yaml are relative to: INSTRUCTBLIP_PEFT_WORKDIR (the test suite
    points it at a temporary directory, so executing the notebooks with their defaults never touches a user's
    data/ or outputs/), else the project folder made by `init`, else the clone, else the working directory."""
    env = os.environ.get(WORKDIR_ENV)
    return Path(env).expanduser().absolute() if env else project_dir() or clone_dir() or Path.cwd()


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

"""Sharing a finished run: `export(run, dest)` writes a self-contained folder, `push(run, repo_id)` uploads
it to the Hugging Face Hub.

- default: the run's layout (artifacts.RunDir) without checkpoints, predictions or notebooks: the peft
  adapter, the trained tensors that are not LoRA, run.json (what base model to rebuild: preset and seed, or
  source) and metrics.json, plus a model card. `load_finetuned(folder)` and `predict` read it as a run.
- merged: LoRA merged into the base weights, the trained tensors written in, saved with `save_pretrained`
  together with the processor: `InstructBlipForConditionalGeneration.from_pretrained(folder)` loads it
  without this package. run.json says "merged" so that `load_finetuned` reads it as such.

Everything is checked before anything is written, and the folder appears whole or not at all
(io.atomic_dir); an existing destination is never written over.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .artifacts import RunDir
from .errors import UserError
from .experiments import get_experiment
from .hf_hub import fetch, is_repo_id, upload
from .io import atomic_dir, complete_dir, read_json, write_json, write_text
from .model_card import model_card

ADAPTER_CONFIG = "adapter_config.json"  # peft's name, the marker of a complete adapter directory
# run.json keys that describe the machine the run was trained on, not the model.
LOCAL_KEYS = ("processed_dir",)


def _finished_run(source) -> tuple[RunDir, dict, dict]:
    run = RunDir(fetch(source))
    info = run.finished_run_info()
    return run, info, run.metrics()


def shared_run_info(info: dict, merged: bool) -> dict:
    out = {k: v for k, v in info.items() if k not in LOCAL_KEYS}
    if merged:
        out["merged"] = True
    return out


def export(source, dest, merged: bool = False, *, repo_id: str | None = None) -> Path:
    """Write the finished run `source` (a run directory, an exported folder or a hub repo id) to the new
    folder `dest`; return it. `repo_id`: the name the card's loading lines use (default: dest's name)."""
    dest = Path(dest).expanduser()
    if dest.exists() or dest.is_symlink():
        raise UserError(f"{dest}: already exists; export writes a new folder and never over an existing one "
                        "(choose another DEST or remove it)")
    run, info, metrics = _finished_run(source)
    exp = get_experiment(info["experiment"])
    already_merged = bool(info.get("merged"))
    adapter = None
    if exp.train and exp.has_lora and not already_merged:
        adapter = complete_dir(run.adapter, ADAPTER_CONFIG)
        if adapter is None:
            raise UserError(f"{run.adapter}: missing {ADAPTER_CONFIG} (incomplete run directory)")
    if exp.train and not already_merged and not run.trained_tensors.is_file():
        raise UserError(f"{run.trained_tensors}: missing (incomplete run directory)")
    if already_merged and not merged:
        raise UserError(f"{run.path}: a merged export holds no adapter to export; export the run itself, or "
                        "pass --merged")
    adapter_config = read_json(adapter / ADAPTER_CONFIG, "adapter config") if adapter else None
    card = model_card(info, metrics, merged=merged, where=repo_id or dest.name, adapter_config=adapter_config)

    with atomic_dir(dest) as tmp:
        out = RunDir(tmp)
        if merged:
            _write_merged(run.path, tmp)
        else:
            if adapter is not None:
                shutil.copytree(adapter, out.adapter)
            if exp.train:
                shutil.copyfile(run.trained_tensors, out.trained_tensors)
        write_json(out.run_info_file, shared_run_info(info, merged))
        write_json(out.metrics_file, metrics)
        write_text(out.model_card, card)
    return dest


def _write_merged(run_path: Path, folder: Path) -> None:
    """load_finetuned's model with LoRA merged in, saved as a plain checkpoint with its processor."""
    from .finetuned import load_finetuned
    from .lora import quiet_peft_deprecations

    model, processor, _ = load_finetuned(run_path)
    if hasattr(model, "merge_and_unload"):
        with quiet_peft_deprecations():
            model = model.merge_and_unload()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def push(source, repo_id: str, private: bool = False, merged: bool = False) -> str:
    """Export `source` into a temporary folder and upload it to the hub repo `repo_id` (created if needed,
    kept if it exists); return the repo's URL. The folder is removed afterwards either way."""
    if not is_repo_id(repo_id):
        raise UserError(f"'{repo_id}': not a hub repo id (expected owner/name, e.g. your-name/instructblip-lora)")
    with tempfile.TemporaryDirectory(prefix="instructblip-peft-push-") as tmp:
        folder = export(source, Path(tmp) / repo_id.split("/")[1], merged=merged, repo_id=repo_id)
        return upload(folder, repo_id, private=private)


def exported_files(folder: str | os.PathLike) -> list[str]:
    """The files of an exported folder, relative to it (what an upload sends)."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

"""A fine-tuned model's weights in a run directory: writing them at the end of training, and loading the
whole model back (`load_finetuned(run_dir)`) to evaluate or predict with it.

- `adapter/`: the LoRA weights in peft's format (`PeftModel.from_pretrained(base, run_dir/"adapter")`);
- `trained_tensors.safetensors`: every other trained tensor (query tokens, projection, layer norm, and the
  whole Q-Former where it trains), by name from the InstructBLIP root.

`load_finetuned` also reads what `instructblip-peft export` writes (the same layout; with `--merged`, a plain
checkpoint whose run.json says "merged"), locally or from the hub by repo id.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .artifacts import RunDir
from .config import Settings
from .errors import UserError
from .experiments import get_experiment
from .hf_hub import fetch
from .io import atomic_dir
from .importance import full_rank_adapter
from .lora import base_model, keep_int8_state, non_lora_trainable, quiet_peft_deprecations
from .model import DTYPES, is_quantized, load_model, load_preset, resolve_precision


def write_finetuned(run: RunDir, model) -> None:
    """Write the adapter (if the model has LoRA) and the other trained tensors of `model`."""
    if hasattr(model, "peft_config"):
        with atomic_dir(run.adapter) as tmp, full_rank_adapter(model):
            model.save_pretrained(tmp)
    ckpt.save_tensors(run.trained_tensors, non_lora_trainable(model))


def _adapter_dir(run: RunDir) -> Path | None:
    for d in (run.adapter, run.adapter.with_name(run.adapter.name + ".old")):
        if (d / "adapter_config.json").is_file():
            return d
    return None


def run_dtype(info: dict, device: torch.device | str) -> torch.dtype:
    """The base weights' dtype a run trained with (run.json's precision); runs from before it was recorded:
    what their settings resolve to on `device`."""
    recorded = (info.get("precision") or {}).get("model_dtype")
    if recorded in DTYPES:
        return DTYPES[recorded]
    settings = info.get("settings") or {}
    return resolve_precision(settings.get("mixed_precision", "auto"), settings.get("model_dtype", "auto"), device).dtype


def load_finetuned(output_dir, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, processor, run_info) of a finished run: the preset's base model (tiny presets rebuilt from
    the recorded seed, real ones loaded from their source) loaded straight onto `device`, the adapter and the
    trained tensors (fp32) applied. `output_dir` may also be an exported folder or its hub repo id (downloaded
    once, then cached). `dtype`: the base weights' dtype; None: the one the run used, so that evaluate()
    reproduces the recorded predictions exactly. Any dtype works with evaluate(), which applies autocast
    itself. The model is in eval mode; run_info["settings"] is a Settings."""
    from peft import PeftModel

    run = RunDir(fetch(output_dir))
    info = run.run_info()
    if not run.is_finished():
        raise UserError(f"{run.path}: the run has not finished (no finished {run.metrics_file.name}); run it to "
                        "the end first")
    preset = load_preset(info["preset"])
    exp = get_experiment(info["experiment"])
    device = torch.device(device)
    dtype = dtype or run_dtype(info, device)
    merged = bool(info.get("merged"))  # `export --merged`: LoRA and trained tensors are in the checkpoint
    quantize = "none" if merged else info["settings"].get("quantize", "none")
    model, processor = load_model(preset, source=str(run.path) if merged else info.get("model_source"),
                                  dtype=dtype, device=device, seed=info.get("model_seed", 0), quantize=quantize)
    if exp.train and exp.has_lora and not merged:
        adapter = _adapter_dir(run)
        if adapter is None:
            raise UserError(f"{run.adapter}: missing adapter_config.json (incomplete run directory)")
        with quiet_peft_deprecations():
            model = PeftModel.from_pretrained(model, str(adapter))
        keep_int8_state(model)
    if exp.train and not merged:
        tensors = ckpt.load_tensors(run.trained_tensors)
        params = dict(base_model(model).named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise UserError(f"{run.trained_tensors}: tensors the model does not have: {unknown[:3]}")
        with torch.no_grad():
            for name, t in tensors.items():
                # Trained tensors were fp32 in training (even on a bf16/fp16 base): keep them so.
                params[name].data = t.to(device, torch.float32)
    model = (model if is_quantized(base_model(model)) else model.to(device)).eval()
    info = dict(info, settings=Settings(info["settings"]))
    return model, processor, info

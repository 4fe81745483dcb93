"""What a finished run leaves in its output directory, and loading its fine-tuned model back.

- `adapter/`: the LoRA weights in peft's format (`PeftModel.from_pretrained(base, output_dir/"adapter")`);
- `trained_tensors.safetensors`: every other trained tensor (query tokens, projection, layer norm, and the
  whole Q-Former where it trains), by name from the InstructBLIP root;
- `run.json`: dataset, experiment, preset, model seed/source and the settings, enough to rebuild the model;
- AdaLoRA runs: `adalora_ranks.json`, every adapted module's final rank and importance, and its figure.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Settings
from .errors import UserError
from .experiments import get_experiment
from .io import read_json
from .importance import full_rank_adapter
from .lora import base_model, keep_int8_state, non_lora_trainable, quiet_peft_deprecations
from .model import default_dtype, is_quantized, load_model, load_preset

METRICS = "metrics.json"
RUN_INFO = "run.json"
TRAIN_LOG = "train_log.csv"
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
ADAPTER_DIR = "adapter"
TRAINED_TENSORS = "trained_tensors.safetensors"
ADALORA_RANKS = "adalora_ranks.json"        # AdaLoRA: final rank and importance of every adapted module
ADALORA_RANKS_FIGURE = "adalora_ranks.png"  # ... drawn: Q-Former layer x sublayer, and the LLM's share


def predictions_file(split: str) -> str:
    return f"predictions_{split}.jsonl"


def write_finetuned(output_dir: Path, model) -> None:
    """Write the adapter (if the model has LoRA) and the other trained tensors of `model`."""
    output_dir = Path(output_dir)
    if hasattr(model, "peft_config"):
        with ckpt.write_dir(output_dir / ADAPTER_DIR) as tmp, full_rank_adapter(model):
            model.save_pretrained(tmp)
    ckpt.save_tensors(output_dir / TRAINED_TENSORS, non_lora_trainable(model))


def _adapter_dir(output_dir: Path) -> Path | None:
    for d in (output_dir / ADAPTER_DIR, output_dir / (ADAPTER_DIR + ".old")):
        if (d / "adapter_config.json").is_file():
            return d
    return None


def load_finetuned(output_dir, device: str | torch.device = "cpu"):
    """(model, processor, run_info) of a finished run: the preset's base model (tiny presets rebuilt from
    the recorded seed, real ones loaded from their source), the adapter and the trained tensors applied.
    The model is in eval mode; run_info["settings"] is a Settings."""
    from peft import PeftModel

    output_dir = Path(output_dir)
    info = read_json(output_dir / RUN_INFO, "run info (is this a run's output directory?)")
    metrics_path = output_dir / METRICS
    if not metrics_path.is_file() or read_json(metrics_path).get("status") != "finished":
        raise UserError(f"{output_dir}: the run has not finished (no finished {METRICS}); run it to the end first")
    preset = load_preset(info["preset"])
    exp = get_experiment(info["experiment"])
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else default_dtype(device)
    quantize = info["settings"].get("quantize", "none")
    model, processor = load_model(preset, source=info.get("model_source"), dtype=dtype,
                                  device=device if quantize != "none" else "cpu", seed=info.get("model_seed", 0),
                                  quantize=quantize)
    if exp.train and exp.has_lora:
        adapter = _adapter_dir(output_dir)
        if adapter is None:
            raise UserError(f"{output_dir / ADAPTER_DIR}: missing adapter_config.json (incomplete run directory)")
        with quiet_peft_deprecations():
            model = PeftModel.from_pretrained(model, str(adapter))
        keep_int8_state(model)
    tensors_path = output_dir / TRAINED_TENSORS
    if exp.train:
        tensors = ckpt.load_tensors(tensors_path)
        params = dict(base_model(model).named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise UserError(f"{tensors_path}: tensors the model does not have: {unknown[:3]}")
        with torch.no_grad():
            for name, t in tensors.items():
                # Trained tensors were fp32 in training (even on a bf16/fp16 base): keep them so.
                params[name].data = t.to(torch.float32)
    model = (model if is_quantized(base_model(model)) else model.to(device)).eval()
    info = dict(info, settings=Settings(info["settings"]))
    return model, processor, info

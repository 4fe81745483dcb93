"""Parameter accounting on the real-size architectures (meta device: no download, no memory)."""
from __future__ import annotations

import re
from typing import Any, Mapping

from .config import resolve_settings
from .experiments import RANKLESS_METHODS, Experiment, full_qformer_patterns, get_experiment
from .lora import apply_experiment, base_model, is_adapter_tensor, lora_module_names, non_lora_trainable
from .model import meta_model, preset_for


def count_parameters(model) -> dict:
    """trainable / adapter / total parameter counts of a model with an experiment applied. `lora_params`
    counts the adapter tensors of whichever method (LoRA, DoRA's magnitudes too, AdaLoRA, IA3)."""
    trainable = lora = total = 0
    for name, p in base_model(model).named_parameters():
        n = p.numel()
        total += n
        if is_adapter_tensor(name):
            lora += n
        if p.requires_grad:
            trainable += n
    return {"trainable_params": trainable, "lora_params": lora, "total_params": total}


def full_qformer_size(model) -> int:
    """Size of InstructBLIP's own fine-tuning set (Q-Former, query tokens, projection, ln_vision):
    the paper's reference for "< 2%" / "< 12%" trainable."""
    pats = [re.compile(p) for p in full_qformer_patterns()]
    return sum(p.numel() for n, p in base_model(model).named_parameters()
               if not is_adapter_tensor(n) and any(pat.match(n) for pat in pats))


def account(experiment: Experiment | str, preset: str | None = None, overrides: Mapping[str, Any] | None = None,
            placement: bool = False) -> dict:
    """Counts for one experiment on the real-size architecture of its LLM (or the given preset), under the
    method of `overrides` (e.g. {"peft_method": "dora"}; default LoRA). AdaLoRA counts its initial rank:
    every rank trains until pruning zeroes it. Quantization changes bytes, not counts (see memory_estimate).

    placement=True adds where the experiment trains: "lora_modules" (module name pattern, layer numbers
    as *, -> how many modules) and "non_lora_trainable" (top-level part -> trained non-adapter parameters).
    """
    exp = get_experiment(experiment) if isinstance(experiment, str) else experiment
    settings = resolve_settings(overrides=overrides)
    p = preset_for(exp, preset)
    model = apply_experiment(meta_model(p), exp, settings)
    counts = count_parameters(model)
    ref = full_qformer_size(model)
    method = settings.peft_method if exp.has_lora else None
    row = {"experiment": exp.id, "llm": exp.llm, "label": exp.label,
           "rank": None if method in RANKLESS_METHODS else exp.rank, "preset": p["name"],
           "peft_method": method, **counts, "full_qformer_params": ref,
           "trainable_share_of_full_qformer": counts["trainable_params"] / ref,
           "trainable_share_of_total": counts["trainable_params"] / counts["total_params"]}
    if placement:
        row.update(_placement(model))
    return row


def _placement(model) -> dict:
    lora_modules: dict[str, int] = {}
    for name in lora_module_names(model):
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        lora_modules[pattern] = lora_modules.get(pattern, 0) + 1
    extra: dict[str, int] = {}
    for name, t in non_lora_trainable(model).items():
        parts = name.split(".")
        part = ".".join(parts[:2]) if parts[0] == "vision_model" else parts[0]
        extra[part] = extra.get(part, 0) + t.numel()
    return {"lora_modules": lora_modules, "non_lora_trainable": extra}


# ---------------------------------------------------------------- memory

# AdamW on fp32 trainable tensors: the weight, its gradient and two moments, 4 bytes each.
TRAINABLE_BYTES = 16
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256   # bitsandbytes' 4-bit block sizes (weights; nested absmax)


def _quantized_bytes(n: int, out_features: int, quantize: str, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one quantized linear weight of n elements: the packed codes plus the
    per-block (4-bit) or per-row (8-bit) scales and the small lookup tables."""
    if quantize == "8bit":
        return n + 4 * out_features                      # int8 codes + one fp32 scale per output row
    blocks = -(-n // NF4_BLOCK)
    b = -(-n // 2) + 16 * 4                              # two 4-bit codes per byte, the 16-entry NF4 table
    if double_quant:                                     # absmax as uint8, with fp32 scales per 256 blocks
        b += blocks + 4 * -(-blocks // NF4_NESTED_BLOCK) + 4 + 256 * 4
    else:
        b += 4 * blocks
    return b


def memory_estimate(experiment: Experiment | str, preset: str | None = None,
                    overrides: Mapping[str, Any] | None = None, dtype_bytes: int = 2) -> dict:
    """Static training memory of an experiment on the real-size architecture (meta device), in bytes:
    the frozen weights (bf16 by default, `dtype_bytes`; with -p quantize 4bit|8bit the LLM's linear layers as
    bitsandbytes stores them, lm_head and what experiments.yaml's quantization.skip_modules name excepted;
    modules transformers keeps in fp32, such as T5's `wo`, at 4 bytes) plus 16 bytes per trainable parameter
    (fp32 weight, gradient, AdamW's two moments). Activations come on top: they depend on the batch and
    the sequence lengths and are measured on a GPU (benchmarks/gpu_real_size.py)."""
    from .experiments import quantization_spec

    exp = get_experiment(experiment) if isinstance(experiment, str) else experiment
    settings = resolve_settings(overrides=overrides)
    p = preset_for(exp, preset)
    model = apply_experiment(meta_model(p), exp, settings)
    base = base_model(model)
    quantize = settings.quantize
    spec = quantization_spec()
    skip = list(spec["skip_modules"])
    double_quant = bool(spec["4bit"]["double_quant"])
    keep_fp32 = list(getattr(base.language_model, "_keep_in_fp32_modules", None) or [])
    import torch

    frozen = quantized = 0
    modules = dict(base.named_modules())
    for name, prm in base.named_parameters():
        if prm.requires_grad:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        parts = owner_name.split(".")
        fp32 = any(k in parts for k in keep_fp32) and owner_name.startswith("language_model.")
        if fp32:
            frozen += 4 * prm.numel()
        elif (quantize != "none" and leaf == "weight" and isinstance(owner, torch.nn.Linear)
              and owner_name.startswith("language_model.") and not any(s in owner_name for s in skip)):
            b = _quantized_bytes(prm.numel(), prm.shape[0], quantize, double_quant)
            frozen += b
            quantized += prm.numel()
        else:
            frozen += dtype_bytes * prm.numel()
    trainable = sum(prm.numel() for prm in base.parameters() if prm.requires_grad)
    return {"experiment": exp.id, "preset": p["name"], "peft_method": settings.peft_method, "quantize": quantize,
            "quantized_params": quantized, "frozen_bytes": frozen, "trainable_params": trainable,
            "trainable_bytes": TRAINABLE_BYTES * trainable, "static_bytes": frozen + TRAINABLE_BYTES * trainable}

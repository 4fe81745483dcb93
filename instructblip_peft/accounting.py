"""Parameter accounting on the real-size architectures (meta device: no download, no memory)."""
from __future__ import annotations

import re

from .experiments import Experiment, full_qformer_patterns, get_experiment
from .lora import apply_experiment, base_model, lora_module_names, non_lora_trainable
from .model import meta_model, preset_for


def count_parameters(model) -> dict:
    """trainable / lora / total parameter counts of a model with an experiment applied."""
    trainable = lora = total = 0
    for name, p in base_model(model).named_parameters():
        n = p.numel()
        total += n
        if "lora_" in name:
            lora += n
        if p.requires_grad:
            trainable += n
    return {"trainable_params": trainable, "lora_params": lora, "total_params": total}


def full_qformer_size(model) -> int:
    """Size of InstructBLIP's own fine-tuning set (Q-Former, query tokens, projection, ln_vision):
    the paper's reference for "< 2%" / "< 12%" trainable."""
    pats = [re.compile(p) for p in full_qformer_patterns()]
    return sum(p.numel() for n, p in base_model(model).named_parameters()
               if "lora_" not in n and any(pat.match(n) for pat in pats))


def account(experiment: Experiment | str, preset: str | None = None, placement: bool = False) -> dict:
    """Counts for one experiment on the real-size architecture of its LLM (or the given preset).

    placement=True adds where the experiment trains: "lora_modules" (module name pattern, layer numbers
    as *, -> how many modules) and "non_lora_trainable" (top-level part -> trained non-LoRA parameters).
    """
    exp = get_experiment(experiment) if isinstance(experiment, str) else experiment
    p = preset_for(exp, preset)
    model = apply_experiment(meta_model(p), exp)
    counts = count_parameters(model)
    ref = full_qformer_size(model)
    row = {"experiment": exp.id, "llm": exp.llm, "label": exp.label, "rank": exp.rank, "preset": p["name"],
           **counts, "full_qformer_params": ref,
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

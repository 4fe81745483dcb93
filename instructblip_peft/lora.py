"""Putting an experiment onto a model: the adapters of the chosen peft method (LoRA, DoRA, rsLoRA, AdaLoRA,
IA3) where experiments.yaml says, and which tensors train."""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from typing import Mapping

import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, get_peft_model

from .config import default_settings
from .errors import UserError
from .experiments import (Experiment, check_method, ia3_feedforward_patterns, lora_spec, target_patterns,
                          trainable_patterns)

# Parameter names of adapter tensors: peft prefixes LoRA/DoRA/rsLoRA/AdaLoRA tensors with `lora_` (DoRA's
# magnitude: lora_magnitude_vector; AdaLoRA's: lora_A/lora_E/lora_B) and IA3's vectors with `ia3_`.
ADAPTER_MARKERS = ("lora_", "ia3_")
# A nominal run length for building an AdaLoRA model without training it (parameter accounting): the
# schedule does not change which tensors exist.
NOMINAL_TOTAL_STEPS = 1000


def is_adapter_tensor(name: str) -> bool:
    return any(m in name for m in ADAPTER_MARKERS)


@contextlib.contextmanager
def quiet_peft_deprecations():
    """peft calls `is_gradient_checkpointing`, deprecated in transformers 5.x (a FutureWarning on every
    get_peft_model / PeftModel.from_pretrained); not ours to fix and not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _regex(patterns: list[str]) -> str:
    # A string target_modules is matched by peft with re.fullmatch against the full module name.
    return "(" + ")|(".join(patterns) + ")"


def adalora_ranks(rank: int, settings: Mapping) -> tuple[int, int]:
    """(initial rank, target average rank) of an AdaLoRA run at the experiment's rank."""
    return math.ceil(settings["adalora_init_rank_factor"] * rank), rank


def adalora_schedule(total_steps: int, settings: Mapping) -> tuple[int, int]:
    """(tinit, tfinal) in optimizer steps: the warm-up and final fractions of a run of total_steps, leaving
    at least one step of pruning in between (peft refuses a schedule without one)."""
    tinit = math.floor(settings["adalora_tinit"] * total_steps)
    tfinal = math.floor(settings["adalora_tfinal"] * total_steps)
    if tinit + tfinal >= total_steps:
        raise UserError(f"AdaLoRA needs optimizer steps between its warm-up ({tinit}) and final ({tfinal}) phases, "
                        f"but the run has only {total_steps}: train longer or lower adalora_tinit/adalora_tfinal")
    return tinit, tfinal


def peft_config(experiment: Experiment, settings: Mapping | None = None, total_steps: int | None = None):
    """The peft config of the experiment under settings.peft_method (None when it has no adapters).

    One config covers the Q-Former and the LLM: the paper uses the same rank and alpha for both.
    `total_steps` (the run's optimizer steps) sets AdaLoRA's schedule.
    """
    if not experiment.has_lora:
        return None
    settings = default_settings() if settings is None else settings
    method = settings.get("peft_method", "lora")
    check_method(experiment, settings)
    if not (isinstance(experiment.rank, int) and experiment.rank > 0):
        raise UserError(f"experiment {experiment.id}: LoRA rank must be a positive integer, got {experiment.rank!r}")
    targets = _regex(target_patterns(experiment))
    if method == "ia3":
        ff = ia3_feedforward_patterns(experiment)
        return IA3Config(target_modules=targets, feedforward_modules=_regex(ff) if ff else [])
    common = dict(lora_alpha=settings["lora_alpha"], lora_dropout=float(settings["lora_dropout"]),
                  bias=lora_spec()["bias"], target_modules=targets)
    if method == "adalora":
        init_r, target_r = adalora_ranks(experiment.rank, settings)
        total = total_steps or NOMINAL_TOTAL_STEPS
        tinit, tfinal = adalora_schedule(total, settings)
        return AdaLoraConfig(init_r=init_r, target_r=target_r, total_step=total, tinit=tinit, tfinal=tfinal,
                             deltaT=settings["adalora_delta_t"], beta1=settings["adalora_beta1"],
                             beta2=settings["adalora_beta2"], orth_reg_weight=settings["adalora_orth_reg_weight"],
                             **common)
    return LoraConfig(r=experiment.rank, use_dora=method == "dora", use_rslora=method == "rslora", **common)


def lora_config(experiment: Experiment, settings: Mapping | None = None) -> LoraConfig | None:
    """The experiment's peft config (kept under its old name: LoRA is the default method)."""
    return peft_config(experiment, settings)


def apply_experiment(model, experiment: Experiment, settings: Mapping | None = None, total_steps: int | None = None):
    """Freeze everything, add the experiment's adapters (settings.peft_method, default LoRA), unfreeze its extra
    trainable tensors. `total_steps`: the run's optimizer steps (AdaLoRA's schedule).

    Returns the model to train: a peft.PeftModel when the experiment has adapters, else `model` itself.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    config = peft_config(experiment, settings, total_steps)
    if config is not None:
        # On the meta device there is nothing to initialise; peft then skips allocation.
        meta = next(model.parameters()).is_meta
        with quiet_peft_deprecations():
            model = get_peft_model(model, config, low_cpu_mem_usage=meta)
        keep_int8_state(model)
    patterns = [re.compile(p) for p in trainable_patterns(experiment)]
    base = base_model(model)
    for name, p in base.named_parameters():
        if not is_adapter_tensor(name) and any(pat.match(name) for pat in patterns):
            p.requires_grad_(True)
    return model


def keep_int8_state(model) -> None:
    """DoRA on an 8-bit LLM: peft dequantizes the base weight in every forward through `weight.to(device)`,
    and bitsandbytes' Int8Params.to then marks the weight as freshly quantized (CB set) without its scales
    (SCB, already moved to the layer's state), so the next forward loses them and fails. A pre-forward hook
    drops that stale mark; the layer's state still holds the same int8 weight and scales."""
    if not getattr(base_model(model), "is_loaded_in_8bit", False):
        return
    import bitsandbytes as bnb

    def hook(module, args):
        w = module.weight
        if getattr(w, "CB", None) is not None and getattr(w, "SCB", None) is None and module.state.SCB is not None:
            w.CB = None

    for m in base_model(model).modules():
        if isinstance(m, bnb.nn.Linear8bitLt) and not getattr(m, "_int8_state_hook", False):
            m.register_forward_pre_hook(hook)
            m._int8_state_hook = True


def base_model(model):
    """The InstructBLIP model under a possible peft wrapper (names as in the checkpoint)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_module_names(model) -> list[str]:
    """Names (from the InstructBLIP root) of the modules that carry adapters (LoRA's A/B, or IA3's vector)."""
    base = base_model(model)
    return sorted(n for n, m in base.named_modules()
                  if (hasattr(m, "lora_A") and len(m.lora_A) > 0) or (hasattr(m, "ia3_l") and len(m.ia3_l) > 0))


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in base_model(model).named_parameters() if p.requires_grad}


def non_lora_trainable(model) -> dict[str, torch.nn.Parameter]:
    """Trainable tensors that are not adapters (query tokens, projection, layer norm, maybe Q-Former)."""
    return {n: p for n, p in trainable_parameters(model).items() if not is_adapter_tensor(n)}

"""Putting an experiment onto a model: LoRA where experiments.yaml says, and which tensors train."""
from __future__ import annotations

import contextlib
import re
import warnings

import torch
from peft import LoraConfig, get_peft_model

from .errors import UserError
from .experiments import Experiment, lora_spec, target_patterns, trainable_patterns


@contextlib.contextmanager
def quiet_peft_deprecations():
    """peft calls `is_gradient_checkpointing`, deprecated in transformers 5.x (a FutureWarning on every
    get_peft_model / PeftModel.from_pretrained); not ours to fix and not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def lora_config(experiment: Experiment) -> LoraConfig | None:
    if not experiment.has_lora:
        return None
    if not (isinstance(experiment.rank, int) and experiment.rank > 0):
        raise UserError(f"experiment {experiment.id}: LoRA rank must be a positive integer, got {experiment.rank!r}")
    spec = lora_spec()
    # One config covers the Q-Former and the LLM: the paper uses the same rank and alpha for both.
    # A string target_modules is matched by peft with re.fullmatch against the full module name.
    return LoraConfig(r=experiment.rank, lora_alpha=spec["alpha"], lora_dropout=float(spec["dropout"]),
                      bias=spec["bias"], target_modules="(" + ")|(".join(target_patterns(experiment)) + ")")


def apply_experiment(model, experiment: Experiment):
    """Freeze everything, add the experiment's LoRA adapters, unfreeze its extra trainable tensors.

    Returns the model to train: a peft.PeftModel when the experiment has LoRA, else `model` itself.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    config = lora_config(experiment)
    if config is not None:
        # On the meta device there is nothing to initialise; peft then skips allocation.
        meta = next(model.parameters()).is_meta
        with quiet_peft_deprecations():
            model = get_peft_model(model, config, low_cpu_mem_usage=meta)
    patterns = [re.compile(p) for p in trainable_patterns(experiment)]
    base = base_model(model)
    for name, p in base.named_parameters():
        if "lora_" not in name and any(pat.match(name) for pat in patterns):
            p.requires_grad_(True)
    return model


def base_model(model):
    """The InstructBLIP model under a possible peft wrapper (names as in the checkpoint)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_module_names(model) -> list[str]:
    """Names (from the InstructBLIP root) of the modules that carry LoRA adapters."""
    base = base_model(model)
    return sorted(n for n, m in base.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in base_model(model).named_parameters() if p.requires_grad}


def non_lora_trainable(model) -> dict[str, torch.nn.Parameter]:
    """Trainable tensors that are not LoRA (query tokens, projection, layer norm, maybe Q-Former)."""
    return {n: p for n, p in trainable_parameters(model).items() if "lora_" not in n}

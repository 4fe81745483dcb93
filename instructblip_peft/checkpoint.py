"""Resume state of a training run, written so that a kill at any moment leaves a usable one.

A checkpoint directory holds
- `trainable.safetensors`: every trainable tensor (LoRA and the other trained tensors), by name;
- `optimizer.safetensors`: the optimizer's per-parameter tensors (AdamW moments and step counts);
- `rng.safetensors`: the torch CPU and CUDA generator states;
- `method.safetensors` (AdaLoRA only): the peft method's own training state (its smoothed importance scores);
- `state.json`: everything else (epoch, position in the epoch, step, best-so-far, history, optimizer
  hyper-parameters, python/numpy RNG states, loss-scaler state).
No pickle anywhere: tensors are safetensors, the rest JSON. A checkpoint is written as a whole directory
(io.atomic_dir): a kill leaves the previous complete one.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .artifacts import CHECKPOINT_STATE as STATE
from .errors import UserError
from .io import atomic_dir, atomic_path, complete_dir, write_json

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
METHOD = "method.safetensors"


def existing_dir(path: str | os.PathLike) -> Path | None:
    """The checkpoint (or best/) directory at `path`, or the complete older copy a kill left beside it."""
    return complete_dir(path, STATE)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise UserError(f"{path}: not found (incomplete run directory?)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path}: cannot read tensors ({e})") from None


# ---------------------------------------------------------------- optimizer state

def optimizer_tensors_and_meta(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and JSON-able hyper-parameters."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------- RNG state

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- whole checkpoints

def save_checkpoint(path: Path, trainable: dict[str, torch.Tensor], optimizer, state: dict,
                    scaler=None, method: tuple[dict[str, torch.Tensor], dict] | None = None) -> None:
    """Write a complete checkpoint to `path` (atomically, as a directory). `method`: the peft method's own
    state as (tensors, JSON-able), see importance.MethodState."""
    opt_tensors, opt_meta = optimizer_tensors_and_meta(optimizer)
    rng_tensors, rng_meta = rng_state()
    method_tensors, method_meta = method or ({}, {})
    full_state = dict(state, optimizer=opt_meta, rng=rng_meta,
                      scaler=scaler.state_dict() if scaler is not None else None, method=method_meta)
    with atomic_dir(path) as tmp:
        save_tensors(tmp / TRAINABLE, trainable)
        save_tensors(tmp / OPTIMIZER, opt_tensors)
        save_tensors(tmp / RNG, rng_tensors)
        if method_tensors:
            save_tensors(tmp / METHOD, method_tensors)
        write_json(tmp / STATE, full_state, indent=None)


def load_checkpoint(path: Path) -> dict:
    """{'trainable': tensors, 'optimizer': state_dict, 'rng': (tensors, meta), 'state': dict}."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path / STATE}: cannot read the checkpoint ({e}); delete {path} or pass force=True "
                        "(--force) to start over") from None
    try:
        tensors = {name: load_tensors(path / name) for name in (TRAINABLE, OPTIMIZER, RNG)}
    except UserError as e:
        # No older copy survives a completed write (checkpoint.old/ is removed), so there is nothing to fall
        # back to: say what is damaged and how to go on.
        raise UserError(f"{e}: the checkpoint in {path} is damaged; delete {path} or pass force=True "
                        "(--force) to start over") from None
    method_meta = state.pop("method", None) or {}
    try:
        method_tensors = load_tensors(path / METHOD) if (path / METHOD).is_file() else {}
    except UserError as e:
        raise UserError(f"{e}: the checkpoint in {path} is damaged; delete {path} or pass force=True "
                        "(--force) to start over") from None
    return {"trainable": tensors[TRAINABLE],
            "optimizer": optimizer_state_dict(tensors[OPTIMIZER], state.pop("optimizer")),
            "rng": (tensors[RNG], state.pop("rng")),
            "scaler": state.pop("scaler", None),
            "method": (method_tensors, method_meta),
            "state": state}


def load_into(named_params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor], source) -> None:
    """Copy saved tensors into the model's parameters; every name must match both ways."""
    missing, unexpected = set(named_params) - set(tensors), set(tensors) - set(named_params)
    if missing or unexpected:
        raise UserError(f"{source}: saved tensors do not match the model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}); was it written by another experiment/preset?")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))

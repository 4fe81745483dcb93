"""The experiment registry: ID -> what trains, where LoRA goes, and the recipe. Read from params/."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .config import load_yaml
from .errors import UserError


@dataclass(frozen=True)
class Experiment:
    id: str                        # "15", or a baseline name such as "zeroshot-flant5xl"
    llm: str                       # flant5xl | vicuna7b
    family: str                    # t5 | llama
    label: str                     # human-readable group, e.g. "Q-Former LoRA all"
    group: str                     # group name, e.g. "qformer_all" (baselines: their name stem)
    rank: int | None               # LoRA rank (None: no LoRA)
    qformer_targets: tuple = ()    # keys of targets.qformer
    llm_targets: tuple = ()        # keys of targets.<family>
    train: bool = True
    full_qformer: bool = False     # the whole Q-Former trains (not only LoRA)
    base_learning_rate: float | None = None

    @property
    def number(self) -> int | None:
        return int(self.id) if self.id.isdigit() else None

    @property
    def has_lora(self) -> bool:
        return bool(self.qformer_targets or self.llm_targets)

    def learning_rate(self, dataset: str) -> float:
        spec = _spec()["learning_rate"]
        if self.number is not None:
            exceptions = spec["exceptions"].get(dataset) or {}
            if self.number in exceptions:
                return float(exceptions[self.number])
        if self.base_learning_rate is not None:
            return self.base_learning_rate
        return float(spec["qformer_lora"] if self.qformer_targets else spec["llm_lora"])

    def epochs(self, dataset: str) -> int:
        spec = _spec()["epochs"]
        exceptions = (spec.get("exceptions") or {}).get(dataset) or {}
        return int(exceptions.get(self.number, spec["default"]))

    def describe(self) -> str:
        if self.rank is None:
            return f"{self.id}: {self.label} ({self.llm})"
        return f"{self.id}: {self.label}, rank {self.rank} ({self.llm})"


@lru_cache(maxsize=1)
def _spec() -> dict:
    return load_yaml("experiments.yaml")


def _build_registry() -> dict[str, Experiment]:
    spec = _spec()
    reg: dict[str, Experiment] = {}
    number = 1
    for llm in spec["llms"]:
        for group in spec["groups"]:
            for rank in spec["ranks"]:
                full_q = bool(spec.get("train_full_qformer_without_qformer_lora")) and not group["qformer"]
                reg[str(number)] = Experiment(
                    id=str(number), llm=llm["name"], family=llm["family"], label=group["label"],
                    group=group["name"], rank=int(rank), qformer_targets=tuple(group["qformer"]),
                    llm_targets=tuple(group["llm"]), full_qformer=full_q)
                number += 1
    for pattern, base in (spec.get("baselines") or {}).items():
        for llm in spec["llms"]:
            name = pattern.format(llm=llm["name"])
            train = bool(base.get("train", True))
            reg[name] = Experiment(
                id=name, llm=llm["name"], family=llm["family"], label=base["label"],
                group=pattern.split("-{")[0], rank=None, train=train, full_qformer=train,
                base_learning_rate=base.get("learning_rate"))
    return reg


@lru_cache(maxsize=1)
def registry() -> dict[str, Experiment]:
    return _build_registry()


def numbered_ids() -> list[str]:
    return [k for k in registry() if k.isdigit()]


def valid_ids_text() -> str:
    nums = numbered_ids()
    names = [k for k in registry() if not k.isdigit()]
    return f"{nums[0]}-{nums[-1]} or one of: {', '.join(names)}"


def get_experiment(experiment_id) -> Experiment:
    key = str(experiment_id).strip()
    if key not in registry():
        raise UserError(f"unknown experiment ID '{experiment_id}'. Valid IDs: {valid_ids_text()}")
    return registry()[key]


def parse_ids(text) -> list[str]:
    """'28' | '1-64' | '13,28,64' | '1-4,zeroshot-flant5xl' -> experiment IDs, in the given order."""
    out: list[str] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise UserError(f"bad experiment ID range '{part}': start is after end. Valid IDs: {valid_ids_text()}")
            ids = [str(i) for i in range(lo, hi + 1)]
        elif part:
            ids = [part]
        else:
            raise UserError(f"bad experiment ID list '{text}': empty item. Valid IDs: {valid_ids_text()}")
        for i in ids:
            get_experiment(i)  # raises on unknown IDs
        out.extend(i for i in ids if i not in out)
    return out


def lora_spec() -> dict:
    """alpha, dropout, bias (shared by every experiment)."""
    spec = dict(_spec()["lora"])
    if not (isinstance(spec.get("alpha"), (int, float)) and spec["alpha"] > 0):
        raise UserError(f"experiments.yaml: lora.alpha must be positive, got {spec.get('alpha')!r}")
    return spec


def target_patterns(experiment: Experiment) -> list[str]:
    """Regular expressions of the module names that get LoRA in this experiment."""
    targets = _spec()["targets"]
    pats = [targets["qformer"][k] for k in experiment.qformer_targets]
    pats += [targets[experiment.family][k] for k in experiment.llm_targets]
    return pats


def trainable_patterns(experiment: Experiment) -> list[str]:
    """Regular expressions (re.match from the name's start) of non-LoRA parameters that train."""
    spec = _spec()
    if not experiment.train:
        return []
    pats = list(spec["always_trainable"])
    if experiment.full_qformer:
        pats += spec["full_qformer"]
    return pats


def full_qformer_patterns() -> list[str]:
    return list(_spec()["full_qformer"])

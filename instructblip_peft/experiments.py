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
    """bias (shared by every experiment; alpha and dropout are settings: lora_alpha, lora_dropout)."""
    return dict(_spec()["lora"])


def ia3_feedforward_patterns(experiment: Experiment) -> list[str]:
    """Regular expressions of this experiment's target modules that IA3 treats as feed-forward (their input
    is scaled, not their output)."""
    ff = _spec()["ia3_feedforward"]
    pats = [ff["qformer"].get(k) for k in experiment.qformer_targets]
    pats += [ff[experiment.family].get(k) for k in experiment.llm_targets]
    return [p for p in pats if p]


def quantization_spec() -> dict:
    """skip_modules (names kept unquantized) and the 4-bit format."""
    return dict(_spec()["quantization"])


# ---------------------------------------------------------------- the method axis

RANKLESS_METHODS = ("ia3",)   # peft methods without a rank: the rank axis collapses to one run per group


def method_suffix(settings, experiment: Experiment | None = None) -> str:
    """What a run directory name adds to the experiment ID for a non-default method or quantization:
    '' (LoRA, no quantization), '+dora', '+4bit', '+adalora+8bit', ... For an experiment without adapters
    (the baselines) the method does not apply and only the quantization shows."""
    suffix = ""
    method = settings.get("peft_method", "lora")
    if method != "lora" and (experiment is None or experiment.has_lora):
        suffix += "+" + method
    if settings.get("quantize", "none") != "none":
        suffix += "+" + settings["quantize"]
    return suffix


def representative_id(experiment: Experiment, settings) -> str:
    """The ID whose run stands for `experiment` under this method: itself, except for rankless methods
    (IA3), where every rank of a group is one run, that of the group's lowest-rank ID."""
    if settings.get("peft_method", "lora") not in RANKLESS_METHODS or experiment.number is None \
            or not experiment.has_lora:
        return experiment.id
    ranks = _spec()["ranks"]
    return str(experiment.number - ranks.index(experiment.rank))


def run_name(experiment_id, settings) -> str:
    """The run directory name of an experiment under these settings: '28', '28+dora', '25+ia3' (for IDs
    25-28), '64+adalora+4bit'. Distinct runs never share a name; IDs that are one run share it."""
    exp = get_experiment(experiment_id)
    return representative_id(exp, settings) + method_suffix(settings, exp)


def run_names(ids, settings) -> list[str]:
    """run_name of each ID, duplicates dropped (a sweep runs each once), in order."""
    return list(dict.fromkeys(run_name(i, settings) for i in ids))


def check_method(experiment: Experiment, settings) -> None:
    """Refuse what a method cannot do with an experiment, in one line. (Experiments without adapters, the
    baselines, take any method: it does not apply to them.)"""
    method = settings.get("peft_method", "lora")
    if method == "lora" or not experiment.has_lora:
        return
    rep = representative_id(experiment, settings)
    if rep != experiment.id:
        first = int(rep)
        ids = f"{first}-{first + len(_spec()['ranks']) - 1}"
        raise UserError(f"{method} has no rank: experiments {ids} ({experiment.label}, {experiment.llm}) are one "
                        f"{method} run; run ID {rep}")


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

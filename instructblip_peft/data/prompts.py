"""Prompt and answer rendering from processed records, with the templates in params/data.yaml.

Rendering happens at load time, so a template change needs no re-preprocessing.
"""
from __future__ import annotations

from functools import lru_cache

from ..config import load_yaml
from ..errors import UserError

LETTERS = "abcde"


@lru_cache(maxsize=1)
def templates() -> dict:
    return load_yaml("data.yaml")["templates"]


def _template(dataset: str) -> dict:
    t = templates()
    if dataset not in t or dataset == "target":
        raise UserError(f"no prompt template for dataset '{dataset}' in data.yaml (have: "
                        f"{', '.join(k for k in t if k != 'target')})")
    return t[dataset]


def render_options(choices: list[str], dataset: str) -> str:
    t = _template(dataset)
    return t["options_joiner"].join(t["option"].format(letter=LETTERS[i], choice=c) for i, c in enumerate(choices))


def render_prompt(record: dict, dataset: str) -> str:
    """The instruction given to both the Q-Former and the LLM."""
    t = _template(dataset)
    return t["prompt"].format(context=record.get("context") or "", question=record["question"],
                              options=render_options(record["choices"], dataset))


def candidate_texts(record: dict) -> list[str]:
    """Every answer candidate as the model should produce it: "(a) c1", "(b) c2", ..."""
    return [templates()["target"].format(letter=LETTERS[i], choice=c) for i, c in enumerate(record["choices"])]


def target_text(record: dict) -> str:
    return candidate_texts(record)[record["answer_index"]]

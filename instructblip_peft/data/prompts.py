"""Prompt and answer rendering from processed records, with the templates in params/data.yaml.

Rendering happens at load time, so a template change needs no re-preprocessing. The rendered prompt is
then cleaned as the original cleaned it (LAVIS's `instruct_blip_question` text processor, applied in training
and evaluation to the whole prompt, never to the answer), so `render_prompt` returns exactly the text the
model reads.
"""
from __future__ import annotations

import re
from functools import lru_cache

from ..config import load_yaml
from ..errors import UserError

LETTERS = "abcde"
# The original's prompt cleaning: these characters are deleted, trailing spaces stripped, and only the first
# MAX_PROMPT_WORDS space-separated words kept (ScienceQA's longest prompt, lecture included, has ~600).
_DROPPED_CHARS = re.compile(r"[!*#;]")
MAX_PROMPT_WORDS = 1000


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


def clean_prompt(text: str) -> str:
    """The original's cleaning of a rendered prompt: delete ! * # ;, strip trailing spaces, keep at most
    MAX_PROMPT_WORDS words (split on single spaces, so newlines and runs of spaces are kept as they are)."""
    text = _DROPPED_CHARS.sub("", text).rstrip(" ")
    words = text.split(" ")
    return " ".join(words[:MAX_PROMPT_WORDS]) if len(words) > MAX_PROMPT_WORDS else text


def render_prompt(record: dict, dataset: str, clean: bool = True) -> str:
    """The instruction given to both the Q-Former and the LLM, cleaned as the original did unless
    `clean=False` (the `clean_prompt` setting)."""
    t = _template(dataset)
    empty = t.get("empty_context", "")
    if not isinstance(empty, str):
        raise UserError(f"data.yaml: templates.{dataset}.empty_context must be a string, got {empty!r}")
    text = t["prompt"].format(context=record.get("context") or empty, question=record["question"],
                              options=render_options(record["choices"], dataset))
    return clean_prompt(text) if clean else text


def candidate_texts(record: dict) -> list[str]:
    """Every answer candidate as the model should produce it: "(a) c1", "(b) c2", ..."""
    return [templates()["target"].format(letter=LETTERS[i], choice=c) for i, c in enumerate(record["choices"])]


def target_text(record: dict) -> str:
    return candidate_texts(record)[record["answer_index"]]

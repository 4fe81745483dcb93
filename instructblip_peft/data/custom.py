"""Your own multiple-choice data: a folder with train.jsonl, val.jsonl and test.jsonl, one question per line:

    {"image": "imgs/cat.png", "question": "What animal is this?", "choices": ["cat", "dog"],
     "answer_index": 0, "context": "optional text", "question_id": "optional, default <split>-<line>",
     "meta": {"optional": "fields kept for per-category results"}}

`image` is relative to the folder (or absolute), or null for a text-only question.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .records import SPLITS, Issues, choice_problem, image_problem, iter_progress, make_record

REQUIRED = ("image", "question", "choices", "answer_index")
OPTIONAL = ("context", "question_id", "meta")


def check_files(raw: Path) -> None:
    missing = [str(raw / f"{s}.jsonl") for s in SPLITS if not (raw / f"{s}.jsonl").is_file()]
    if missing:
        raise UserError(f"custom dataset: missing file(s) {', '.join(missing)} (one JSONL per split: "
                        f"{', '.join(s + '.jsonl' for s in SPLITS)})")


def read(raw: Path, *, issues: Issues, progress: bool = True) -> dict:
    check_files(raw)
    splits = {}
    for split in SPLITS:
        path = raw / f"{split}.jsonl"
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read ({e})") from None
        out = []
        for lineno, line in iter_progress(list(enumerate(lines, 1)), f"custom {split}", progress):
            if not line.strip():
                continue
            qid = f"{split}-{lineno}"
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                issues.bad(split, qid, where, f"not valid JSON ({e})")
                continue
            if not isinstance(row, dict):
                issues.bad(split, qid, where, "line is not a JSON object")
                continue
            qid = str(row.get("question_id") or qid)
            problem = None
            lacking = [k for k in REQUIRED if k not in row]
            unknown = [k for k in row if k not in REQUIRED + OPTIONAL]
            if lacking:
                problem = f"missing field(s) {', '.join(lacking)}"
            elif unknown:
                problem = f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(REQUIRED + OPTIONAL)})"
            elif not isinstance(row.get("context", ""), (str, type(None))):
                problem = "context must be a string"
            elif not isinstance(row.get("meta", {}), (dict, type(None))):
                problem = "meta must be an object"
            elif row["image"] is not None and not isinstance(row["image"], str):
                problem = "image must be a path string or null"
            else:
                problem = choice_problem(row["question"], row["choices"], row["answer_index"])
            if not problem and row["image"] is not None:
                problem = image_problem(raw / row["image"])
            if problem:
                issues.bad(split, qid, where, problem)
                continue
            out.append(make_record(qid, row["image"], row["question"], row["choices"], row["answer_index"],
                                   row.get("context") or "", dict(row.get("meta") or {})))
        splits[split] = out
    return {"splits": splits, "source": str(raw), "layout": "custom-jsonl", "image_root": raw}

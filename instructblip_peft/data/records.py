"""The processed record format: one shape for every dataset, its checks, and reading it back.

Every dataset reader (scienceqa, iconqa, hub, custom) builds records with `make_record` and reports bad ones
through `Issues`; data/preprocess.py writes them (one JSON per split + manifest.json) and `load_split`
reads them. Prompts are not stored: they are rendered at load time from the templates in params/data.yaml
(data/prompts.py).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError
from ..io import read_json
from .prompts import LETTERS, target_text

DATASETS = ("scienceqa", "iconqa", "custom")
SPLITS = ("train", "val", "test")
MAX_CHOICES = len(LETTERS)
MANIFEST = "manifest.json"
DROPPED = "dropped.jsonl"
FORMAT_VERSION = 1


class Issues:
    """Bad records: strict mode raises on the first one; skip mode keeps a report of every drop."""

    def __init__(self, skip_invalid: bool):
        self.skip_invalid = skip_invalid
        self.dropped: list[dict] = []

    def bad(self, split: str, question_id: str, file: str | os.PathLike, problem: str) -> None:
        if not self.skip_invalid:
            raise UserError(f"{file}: question '{question_id}' ({split}): {problem} "
                            f"(fix the file, or pass skip_invalid to drop such records into {DROPPED})")
        self.dropped.append({"split": split, "question_id": question_id, "file": str(file), "problem": problem})

    def counts(self) -> dict:
        c = Counter(d["split"] for d in self.dropped)
        return {s: c.get(s, 0) for s in SPLITS}


def load_json_strict(path: Path, what: str):
    """read_json that also rejects duplicate keys (json.loads would silently keep the last one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")

    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise UserError(f"{path}: duplicate id '{k}' (it appears twice in the file)")
            seen[k] = v
        return seen

    try:
        return json.loads(path.read_text(), object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def choice_problem(question: Any, choices: Any, answer: Any) -> str | None:
    """What is wrong with a question/choices/answer triple, or None."""
    if not isinstance(question, str) or not question.strip():
        return "empty or missing question"
    if not isinstance(choices, list) or not choices:
        return "empty or missing choices"
    if not all(isinstance(c, str) for c in choices):
        return f"choices must be strings, got {choices!r}"
    if len(choices) < 2:
        return f"only {len(choices)} choice (need 2 to {MAX_CHOICES})"
    if len(choices) > MAX_CHOICES:
        return f"{len(choices)} choices (at most {MAX_CHOICES} are supported: options ({LETTERS[0]})-({LETTERS[-1]}))"
    if isinstance(answer, bool) or not isinstance(answer, int):
        return f"answer must be an integer index into choices, got {answer!r}"
    if not 0 <= answer < len(choices):
        return f"answer index {answer} out of range for {len(choices)} choices"
    return None


def image_problem(path: Path) -> str | None:
    """Why `path` is not a readable image, or None. PIL's verify() checks the file without decoding it."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"image unreadable: {path} ({type(e).__name__}: {e})"
    return None


def make_record(question_id: str, image: str | None, question: str, choices: list[str], answer_index: int,
                context: str, meta: dict) -> dict:
    rec = {"question_id": str(question_id), "image": image, "question": question, "choices": list(choices),
           "answer_index": int(answer_index), "context": context, "meta": meta}
    rec["answer"] = target_text(rec)
    return {k: rec[k] for k in ("question_id", "image", "question", "choices", "answer_index", "answer",
                                "context", "meta")}


def first_occurrence(seen: dict, split: str, question_id: str, file, issues: Issues) -> bool:
    """False (and reported) if question_id was already listed, in this split or another."""
    if question_id in seen:
        issues.bad(split, question_id, file, f"duplicate id (already listed in '{seen[question_id]}')")
        return False
    seen[question_id] = split
    return True


def check_unique_ids(splits: Mapping[str, list[dict]], issues: Issues, source: str) -> dict:
    """Duplicate question ids within or across splits: the second occurrence is the bad one."""
    seen: dict[str, str] = {}
    out = {}
    for split in SPLITS:
        kept = []
        for rec in splits.get(split, []):
            qid = rec["question_id"]
            if qid in seen:
                issues.bad(split, qid, source, f"duplicate id (already in {seen[qid]})")
                continue
            seen[qid] = split
            kept.append(rec)
        out[split] = kept
    return out


def iter_progress(items, desc: str, progress: bool):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def load_manifest(dataset_dir) -> dict:
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST
    if not path.is_file():
        name = dataset_dir.name if dataset_dir.name in DATASETS else "<dataset>"
        raise UserError(f"no processed data in {dataset_dir} (missing {MANIFEST}): run "
                        f"`instructblip-peft preprocess {name} --raw DIR` first")
    return read_json(path, "manifest")


def load_split(dataset_dir, split: str) -> tuple[list[dict], Path]:
    """The processed records of one split and the directory their image paths are relative to."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (choose from: {', '.join(SPLITS)})")
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    records = read_json(dataset_dir / f"{split}.json", f"processed {split} split")
    if not isinstance(records, list):
        raise UserError(f"{dataset_dir / f'{split}.json'}: expected a list of records")
    if manifest.get("image_root_in_dataset_dir"):
        image_root = dataset_dir.absolute() / Path(manifest["image_root"]).name
    else:
        image_root = Path(manifest["image_root"])
    return records, image_root

"""ScienceQA as downloaded: problems.json + pid_splits.json + images/{split}/{pid}/image.png.

Both the flat download (files at the top of the raw dir) and the official repo's layout
(`data/scienceqa/problems.json`, images under `data/images/` or beside the json files) are found.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .records import (SPLITS, Issues, choice_problem, first_occurrence, image_problem, iter_progress,
                      load_json_strict, make_record)

# Where problems.json and pid_splits.json may sit, relative to the raw dir.
JSON_DIRS = (".", "data/scienceqa", "data", "scienceqa", "ScienceQA/data/scienceqa")
# The ScienceQA paper's categories: the three subjects (by abbreviation), the context (TXT: a hint, IMG: an
# image, NO: neither) and two grade bands. Evaluation's breakdown and the analysis read them from here.
SUBJECT_CATEGORIES = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
SUBJECTS = tuple(SUBJECT_CATEGORIES)
CATEGORIES = (*SUBJECT_CATEGORIES.values(), "TXT", "IMG", "NO", "G1-6", "G7-12")


def find_json_dir(raw: Path) -> Path:
    for rel in JSON_DIRS:
        d = raw / rel
        if (d / "problems.json").is_file():
            if not (d / "pid_splits.json").is_file():
                raise UserError(f"{d / 'problems.json'} found but {d / 'pid_splits.json'} is missing")
            return d
    looked = ", ".join(str(raw / rel / "problems.json") for rel in JSON_DIRS)
    raise UserError(f"ScienceQA problems.json not found under {raw} (looked in: {looked})")


def find_image_dir(raw: Path, json_dir: Path) -> Path:
    """The directory holding images/{split}/{pid}/; the first candidate that exists, else the json dir's."""
    candidates = [json_dir / "images", raw / "images", json_dir.parent / "images", raw / "data" / "images"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def context_of(problem: dict) -> str:
    # The original concatenated hint and lecture with one space; kept as is so prompts match it.
    hint, lecture = problem.get("hint") or "", problem.get("lecture") or ""
    return "" if not hint and not lecture else hint + " " + lecture


def read(raw: Path, *, keep_text_only: bool, issues: Issues, progress: bool = True) -> dict:
    json_dir = find_json_dir(raw)
    problems_path, splits_path = json_dir / "problems.json", json_dir / "pid_splits.json"
    problems = load_json_strict(problems_path, "ScienceQA problems file")
    pid_splits = load_json_strict(splits_path, "ScienceQA split file")
    if not isinstance(problems, dict):
        raise UserError(f"{problems_path}: expected an object keyed by problem id, got {type(problems).__name__}")
    if not isinstance(pid_splits, dict):
        raise UserError(f"{splits_path}: expected an object with train/val/test lists")
    missing = [s for s in SPLITS if s not in pid_splits]
    if missing:
        raise UserError(f"{splits_path}: missing split(s) {', '.join(missing)} (have: {', '.join(pid_splits)})")
    image_dir = find_image_dir(raw, json_dir)
    image_root = image_dir.parent

    splits, text_only, seen = {}, {}, {}
    for split in SPLITS:
        pids = pid_splits[split]
        if not isinstance(pids, list):
            raise UserError(f"{splits_path}: '{split}' must be a list of problem ids")
        out, n_text = [], 0
        for pid in iter_progress(pids, f"scienceqa {split}", progress):
            pid = str(pid)
            if not first_occurrence(seen, split, pid, splits_path, issues):
                continue
            p = problems.get(pid)
            if p is None:
                issues.bad(split, pid, splits_path, f"id listed in '{split}' but not in {problems_path.name}")
                continue
            if not isinstance(p, dict):
                issues.bad(split, pid, problems_path, "entry is not an object")
                continue
            problem = choice_problem(p.get("question"), p.get("choices"), p.get("answer"))
            if problem:
                issues.bad(split, pid, problems_path, problem)
                continue
            image_name = p.get("image")
            if not image_name:
                if not keep_text_only:
                    n_text += 1
                    continue
                image = None
            else:
                rel = Path(image_dir.name) / split / pid / image_name
                bad_image = image_problem(image_root / rel)
                if bad_image:
                    issues.bad(split, pid, problems_path, bad_image)
                    continue
                image = rel.as_posix()
            subject = p.get("subject")
            if subject not in SUBJECTS:
                issues.bad(split, pid, problems_path,
                           f"subject {subject!r} is not one of {', '.join(SUBJECTS)}")
                continue
            meta = {"subject": subject, "grade": p.get("grade"), "has_hint": bool(p.get("hint")),
                    "has_image": image is not None, "topic": p.get("topic"), "category": p.get("category")}
            out.append(make_record(pid, image, p["question"], p["choices"], p["answer"], context_of(p), meta))
        splits[split] = out
        text_only[split] = n_text
    filtered = {} if keep_text_only else {"text_only_skipped": text_only}
    return {"splits": splits, "source": str(problems_path), "layout": "scienceqa-problems-json",
            "image_root": image_root, "filtered": filtered}

"""IconQA's multiple-choice text questions (ques_type "choose_txt"), in either download layout:

- problems layout: `iconqa_data/problems.json` + `pid_splits.json` (keys `choose_txt_train`, ...),
  images at `iconqa_data/iconqa/{split}/choose_txt/{pid}/image.png`, optional `pid2skills.json`;
- per-question layout: `{split}/choose_txt/{pid}/data.json` + `image.png` (under the raw dir,
  `iconqa/` or `iconqa_data/iconqa/`).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .records import (SPLITS, Issues, choice_problem, first_occurrence, image_problem, iter_progress,
                      load_json_strict, make_record)

QUES_TYPE = "choose_txt"
JSON_DIRS = (".", "iconqa_data")
QUESTION_DIRS = (".", "iconqa", "iconqa_data/iconqa", "iconqa_data")


def _pid_order(pid: str):
    return (0, int(pid), "") if pid.isdigit() else (1, 0, pid)


def _skills(dirs: list[Path]) -> tuple[dict, str | None]:
    for d in dirs:
        path = d / "pid2skills.json"
        if path.is_file():
            skills = load_json_strict(path, "IconQA skills file")
            if not isinstance(skills, dict):
                raise UserError(f"{path}: expected an object mapping problem id to a list of skills")
            return skills, str(path)
    return {}, None


def _record(pid: str, p: dict, image_rel: str, skills: dict) -> dict:
    s = skills.get(pid) or []
    meta = {"grade": p.get("grade"), "skills": list(s) if isinstance(s, list) else [s]}
    return make_record(pid, image_rel, p["question"], p["choices"], p["answer"], "", meta)


def _check(split: str, pid: str, p, file: Path, image_root: Path, image_rel: str, issues: Issues) -> bool:
    if not isinstance(p, dict):
        issues.bad(split, pid, file, "entry is not an object")
        return False
    if p.get("ques_type", QUES_TYPE) != QUES_TYPE:
        issues.bad(split, pid, file, f"ques_type is {p.get('ques_type')!r}, expected '{QUES_TYPE}'")
        return False
    problem = choice_problem(p.get("question"), p.get("choices"), p.get("answer")) \
        or image_problem(image_root / image_rel)
    if problem:
        issues.bad(split, pid, file, problem)
        return False
    return True


def find_layout(raw: Path) -> tuple[str, Path]:
    """("problems", the folder of problems.json) or ("per_question", the folder holding {split}/choose_txt/);
    a UserError saying where it looked when neither is there."""
    for rel in JSON_DIRS:
        d = raw / rel
        if (d / "problems.json").is_file():
            if not (d / "pid_splits.json").is_file():
                raise UserError(f"{d / 'problems.json'} found but {d / 'pid_splits.json'} is missing")
            return "problems", d
    for rel in QUESTION_DIRS:
        d = raw / rel
        if any((d / s / QUES_TYPE).is_dir() for s in SPLITS):
            return "per_question", d
    looked = [str(raw / rel / "problems.json") for rel in JSON_DIRS] + \
             [str(raw / rel / "{train,val,test}" / QUES_TYPE) for rel in QUESTION_DIRS]
    raise UserError(f"IconQA data not found under {raw} (looked for: {', '.join(looked)})")


def read(raw: Path, *, issues: Issues, progress: bool = True) -> dict:
    layout, d = find_layout(raw)
    if layout == "problems":
        return _read_problems(d, issues, progress)
    return _read_per_question(raw, d, issues, progress)


def _read_problems(json_dir: Path, issues: Issues, progress: bool) -> dict:
    problems_path, splits_path = json_dir / "problems.json", json_dir / "pid_splits.json"
    problems = load_json_strict(problems_path, "IconQA problems file")
    pid_splits = load_json_strict(splits_path, "IconQA split file")
    if not isinstance(problems, dict):
        raise UserError(f"{problems_path}: expected an object keyed by problem id, got {type(problems).__name__}")
    if not isinstance(pid_splits, dict):
        raise UserError(f"{splits_path}: expected an object with {QUES_TYPE}_train/val/test lists")
    keys = {s: f"{QUES_TYPE}_{s}" for s in SPLITS}
    missing = [k for k in keys.values() if k not in pid_splits]
    if missing:
        raise UserError(f"{splits_path}: missing key(s) {', '.join(missing)} (have: {', '.join(pid_splits)})")
    image_root = json_dir
    skills, skills_path = _skills([json_dir, json_dir.parent])
    splits, seen = {}, {}
    for split in SPLITS:
        pids = pid_splits[keys[split]]
        if not isinstance(pids, list):
            raise UserError(f"{splits_path}: '{keys[split]}' must be a list of problem ids")
        out = []
        for pid in iter_progress(pids, f"iconqa {split}", progress):
            pid = str(pid)
            if not first_occurrence(seen, split, pid, splits_path, issues):
                continue
            p = problems.get(pid)
            if p is None:
                issues.bad(split, pid, splits_path, f"id listed in '{keys[split]}' but not in {problems_path.name}")
                continue
            image_name = (p.get("image") if isinstance(p, dict) else None) or "image.png"
            image_rel = f"iconqa/{split}/{QUES_TYPE}/{pid}/{image_name}"
            if _check(split, pid, p, problems_path, image_root, image_rel, issues):
                out.append(_record(pid, p, image_rel, skills))
        splits[split] = out
    return {"splits": splits, "source": str(problems_path), "layout": "iconqa-problems-json",
            "image_root": image_root, "skills_file": skills_path}


def _read_per_question(raw: Path, root: Path, issues: Issues, progress: bool) -> dict:
    missing = [str(root / s / QUES_TYPE) for s in SPLITS if not (root / s / QUES_TYPE).is_dir()]
    if missing:
        raise UserError(f"IconQA per-question layout under {root}: missing folder(s) {', '.join(missing)}")
    skills, skills_path = _skills(list(dict.fromkeys([root, root.parent, raw])))
    splits = {}
    for split in SPLITS:
        qdir = root / split / QUES_TYPE
        pids = sorted((d.name for d in qdir.iterdir() if d.is_dir()), key=_pid_order)
        out = []
        for pid in iter_progress(pids, f"iconqa {split}", progress):
            data_path = qdir / pid / "data.json"
            if not data_path.is_file():
                issues.bad(split, pid, data_path, "data.json not found")
                continue
            try:
                p = json.loads(data_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                issues.bad(split, pid, data_path, f"not valid JSON ({e})")
                continue
            image_rel = f"{split}/{QUES_TYPE}/{pid}/image.png"
            if _check(split, pid, p, data_path, root, image_rel, issues):
                out.append(_record(pid, p, image_rel, skills))
        splits[split] = out
    return {"splits": splits, "source": str(root), "layout": "iconqa-per-question",
            "image_root": root, "skills_file": skills_path}

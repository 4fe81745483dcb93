"""Raw (unprocessed) ScienceQA in its download layout, small enough to write in a test, and edits to it."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def png(path: Path, colour=(200, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def problem(question="What color is the shape?", choices=("red", "blue"), answer=1, hint="A hint.",
            lecture="A lecture.", image="image.png", split="train", subject="natural science", **kw):
    return {"question": question, "choices": list(choices), "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": "grade3", "subject": subject, "topic": "physics",
            "category": "Identify colors", "skill": "s", "lecture": lecture, "solution": "", "split": split, **kw}


def scienceqa_raw(root: Path, json_subdir: str = ".", image_parent: str = ".") -> Path:
    """Six problems: two per split with an image, plus one text-only problem in train."""
    problems = {
        "1": problem(),
        "2": problem(question="Which shape is shown?", choices=["circle", "square", "star"], answer=0,
                     hint="", lecture="", subject="social science"),
        "3": problem(image=None, hint="The shape is red.", lecture="", subject="language science"),
        "4": problem(split="val"), "5": problem(split="val", hint="", lecture="Only a lecture."),
        "6": problem(split="test"), "7": problem(split="test"),
    }
    splits = {"train": ["1", "2", "3"], "val": ["4", "5"], "test": ["6", "7"], "trainval": ["1", "2", "3", "4", "5"],
              "minitrain": ["1"], "minival": ["4"], "minitest": ["6"]}
    jdir = root / json_subdir
    jdir.mkdir(parents=True, exist_ok=True)
    (jdir / "problems.json").write_text(json.dumps(problems))
    (jdir / "pid_splits.json").write_text(json.dumps(splits))
    for pid, p in problems.items():
        if p["image"]:
            png(root / image_parent / "images" / p["split"] / pid / "image.png")
    return root


def edit_problems(raw: Path, fn) -> None:
    """Apply `fn` to problems.json's dict in place."""
    p = json.loads((raw / "problems.json").read_text())
    fn(p)
    (raw / "problems.json").write_text(json.dumps(p))


def edit_splits(raw: Path, fn) -> None:
    """Apply `fn` to pid_splits.json's dict in place."""
    s = json.loads((raw / "pid_splits.json").read_text())
    fn(s)
    (raw / "pid_splits.json").write_text(json.dumps(s))

"""ScienceQA in the Hugging Face hub schema (derek-thomas/ScienceQA): one `datasets.Dataset` per split
with columns image (PIL or None), question, choices, answer, hint, task, grade, subject, topic,
category, skill, lecture, solution; no problem id and no split column.

Lets Colab users skip the manual download: `preprocess("scienceqa", load_dataset("derek-thomas/ScienceQA"))`.
Images are written out as PNG files under the processed dataset's `images/` folder.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from .records import SPLITS, Issues, choice_problem, iter_progress, make_record
from .scienceqa import SUBJECTS, context_of

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
REQUIRED_COLUMNS = ("image", "question", "choices", "answer")


def _as_pil(value):
    """The image of a row as a PIL image, or None; a Dataset cast with Image(decode=False) gives dicts."""
    from PIL import Image

    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, Mapping) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, Mapping) and value.get("path"):
        return Image.open(value["path"])
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def read(datasets: Mapping, work_image_dir: Path, final_image_dir: Path, *, keep_text_only: bool,
         issues: Issues, progress: bool = True) -> dict:
    by_split = {}
    for name, ds in datasets.items():
        if name not in SPLIT_NAMES:
            raise UserError(f"hub ScienceQA: unknown split '{name}' (expected train, validation/val, test)")
        by_split[SPLIT_NAMES[name]] = ds
    missing = [s for s in SPLITS if s not in by_split]
    if missing:
        raise UserError(f"hub ScienceQA: missing split(s) {', '.join(missing)} (have: {', '.join(datasets)})")

    splits, text_only = {}, {}
    for split in SPLITS:
        ds = by_split[split]
        source = f"hub ScienceQA split '{split}'"
        columns = getattr(ds, "column_names", None) or []
        lacking = [c for c in REQUIRED_COLUMNS if c not in columns]
        if lacking:
            raise UserError(f"{source}: missing column(s) {', '.join(lacking)} (have: {', '.join(columns)})")
        out, n_text = [], 0
        for i, row in enumerate(iter_progress(ds, f"scienceqa (hub) {split}", progress)):
            qid = f"{split}-{i}"
            problem = choice_problem(row.get("question"), row.get("choices"), row.get("answer"))
            if problem:
                issues.bad(split, qid, source, problem)
                continue
            if row.get("subject") not in SUBJECTS:
                issues.bad(split, qid, source, f"subject {row.get('subject')!r} is not one of {', '.join(SUBJECTS)}")
                continue
            try:
                pil = _as_pil(row["image"])
            except (OSError, TypeError, ValueError) as e:
                issues.bad(split, qid, source, f"image unreadable ({type(e).__name__}: {e})")
                continue
            if pil is None:
                if not keep_text_only:
                    n_text += 1
                    continue
                image = None
            else:
                image = f"{split}/{qid}.png"
                path = work_image_dir / image
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    if pil.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):
                        pil = pil.convert("RGB")
                    pil.save(path, format="PNG")
                except (OSError, ValueError) as e:
                    issues.bad(split, qid, source, f"image cannot be saved as PNG ({e})")
                    continue
            meta = {"subject": row["subject"], "grade": row.get("grade"), "has_hint": bool(row.get("hint")),
                    "has_image": image is not None, "topic": row.get("topic"), "category": row.get("category")}
            out.append(make_record(qid, image, row["question"], row["choices"], row["answer"], context_of(row), meta))
        splits[split] = out
        text_only[split] = n_text
    return {"splits": splits, "source": "hub ScienceQA (datasets.Dataset)", "layout": "scienceqa-hub",
            "image_root": final_image_dir, "image_root_in_dataset_dir": True,
            "filtered": {} if keep_text_only else {"text_only_skipped": text_only}}

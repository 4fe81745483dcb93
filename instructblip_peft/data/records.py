"""Raw downloads -> processed records (one JSON per split + manifest.json), and reading them back.

Every dataset reader (scienceqa, iconqa, hub, custom) yields records in one shape; this module checks
them, writes them atomically and loads them. Prompts are not stored: they are rendered at load time
from the templates in params/data.yaml (data/prompts.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from ..config import default_settings, path_setting
from ..errors import UserError
from ..io import read_json, write_json, write_jsonl
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


def _defaults(keep_text_only, skip_invalid) -> tuple[bool, bool]:
    d = default_settings()
    return (d["keep_text_only"] if keep_text_only is None else bool(keep_text_only),
            d["skip_invalid"] if skip_invalid is None else bool(skip_invalid))


def _is_hub(raw) -> bool:
    return isinstance(raw, Mapping) or type(raw).__name__ in ("DatasetDict", "Dataset")


def preprocess(dataset: str, raw, processed_dir=None, *, keep_text_only: bool | None = None,
               skip_invalid: bool | None = None, progress: bool = True) -> dict:
    """Turn a raw download into `<processed_dir>/<dataset>/{train,val,test}.json` + manifest.json.

    `raw` is the downloaded directory (any path), or for scienceqa a `datasets.DatasetDict` / dict of
    split -> `datasets.Dataset` in the hub schema. Everything is built in a temporary directory and only
    then moved into place, so an error leaves no processed file behind. Returns the manifest.
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}' (choose from: {', '.join(DATASETS)})")
    keep_text_only, skip_invalid = _defaults(keep_text_only, skip_invalid)
    processed_dir = Path(path_setting("processed_dir") if processed_dir is None else processed_dir)
    final_dir = (processed_dir / dataset).absolute()
    issues = Issues(skip_invalid)
    hub = _is_hub(raw)
    if hub and dataset != "scienceqa":
        raise UserError(f"a datasets.Dataset input is only supported for scienceqa (the ScienceQA hub "
                        f"schema), not '{dataset}'; give {dataset} a directory")
    if not hub:
        if raw is None or not Path(raw).is_dir():
            raise UserError(f"raw {dataset} directory not found: {raw}")
        raw = Path(raw).absolute()

    try:
        processed_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dataset}.partial-", dir=processed_dir))
    except OSError as e:
        raise UserError(f"cannot write to {processed_dir}: {e.strerror or e}") from None
    try:
        if hub:
            from . import hub as reader

            result = reader.read(raw, work / "images", final_dir / "images", keep_text_only=keep_text_only,
                                 issues=issues, progress=progress)
        elif dataset == "scienceqa":
            from . import scienceqa as reader

            result = reader.read(raw, keep_text_only=keep_text_only, issues=issues, progress=progress)
        elif dataset == "iconqa":
            from . import iconqa as reader

            result = reader.read(raw, issues=issues, progress=progress)
        else:
            from . import custom as reader

            result = reader.read(raw, issues=issues, progress=progress)
        splits = check_unique_ids(result["splits"], issues, result["source"])
        empty = [s for s in SPLITS if not splits[s]]
        if empty:
            raise UserError(f"{result['source']}: no usable questions for split(s) {', '.join(empty)}"
                            + (f" ({len(issues.dropped)} dropped, see messages above)" if issues.dropped else ""))
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "source": result["source"],
            "layout": result["layout"],
            "image_root": str(result["image_root"]),
            # Images written by preprocessing live inside the dataset dir; found relative to it on load
            # so the processed dir can be moved (e.g. to a mounted drive).
            "image_root_in_dataset_dir": bool(result.get("image_root_in_dataset_dir", False)),
            "counts": {s: len(splits[s]) for s in SPLITS},
            "filtered": result.get("filtered", {}),
            "dropped": issues.counts(),
            **({"skills_file": result["skills_file"]} if "skills_file" in result else {}),
            "options": {"keep_text_only": keep_text_only if dataset == "scienceqa" else None,
                        "skip_invalid": skip_invalid},
        }
        for split in SPLITS:
            write_json(work / f"{split}.json", splits[split], indent=None)
        if skip_invalid:
            write_jsonl(work / DROPPED, issues.dropped)
        write_json(work / MANIFEST, manifest)
        _install(work, final_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        _print_summary(manifest, final_dir)
    return manifest


OWNED = (*(f"{s}.json" for s in SPLITS), DROPPED, "images", MANIFEST)  # manifest last: it marks completion


def _install(work: Path, final_dir: Path) -> None:
    """Move the finished files into final_dir by renames, leaving other files there alone (e.g. the
    executed preprocessing notebook). The old manifest goes first and the new one comes last, so a kill
    in between leaves a directory that load_split refuses rather than a mix of old and new splits."""
    try:
        final_dir.mkdir(parents=True, exist_ok=True)
        (final_dir / MANIFEST).unlink(missing_ok=True)
        for name in OWNED:
            src, dst = work / name, final_dir / name
            if dst.is_dir() and not dst.is_symlink():
                aside = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=final_dir))
                os.replace(dst, aside / name)
                shutil.rmtree(aside, ignore_errors=True)
            elif dst.exists() or dst.is_symlink():
                dst.unlink()
            if src.exists():
                os.replace(src, dst)
    except OSError as e:
        raise UserError(f"cannot write {final_dir}: {e.strerror or e}") from None


def _swap_into_place(work: Path, final_dir: Path) -> None:
    """Replace final_dir (wholly owned by the caller) by work with renames: complete old or complete new."""
    old = None
    try:
        if final_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
            os.replace(final_dir, old / final_dir.name)
        os.replace(work, final_dir)
    except OSError as e:
        if old is not None and not final_dir.exists() and (old / final_dir.name).exists():
            with contextlib.suppress(OSError):
                os.replace(old / final_dir.name, final_dir)
        raise UserError(f"cannot write {final_dir}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _print_summary(manifest: dict, final_dir: Path) -> None:
    print(f"{manifest['dataset']}: wrote {final_dir}")
    for s in SPLITS:
        extra = []
        if manifest["dropped"].get(s):
            extra.append(f"{manifest['dropped'][s]} dropped (see {DROPPED})")
        for why, counts in manifest["filtered"].items():
            if counts.get(s):
                extra.append(f"{counts[s]} {why.replace('_', ' ')}")
        print(f"  {s:5s} {manifest['counts'][s]:6d} questions" + (f"  ({'; '.join(extra)})" if extra else ""))


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

"""Raw downloads -> processed records: `<processed>/<dataset>/{train,val,test}.json` + manifest.json.

`raw_source` decides what to read (a directory, the bundled sample, or a hub dataset); the dataset's
reader (scienceqa, iconqa, hub, custom) turns it into records; `preprocess` checks them and installs them
atomically. Notebook 01 calls `preprocess`; the CLI's `preprocess` runs notebook 01.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from ..config import default_settings, processed_root
from ..errors import UserError
from ..io import write_json, write_jsonl
from .records import DATASETS, DROPPED, MANIFEST, SPLITS, FORMAT_VERSION, Issues, check_unique_ids

HUB_PREFIX = "hub:"


def raw_source(dataset: str, raw_dir: str | os.PathLike | None):
    """What to preprocess: a directory; when raw_dir is empty, <raw_dir>/<dataset> of paths.yaml if it holds a
    finished `instructblip-peft download`, else the bundled sample (generated if missing); or for ScienceQA
    `hub:<name>` (e.g. hub:derek-thomas/ScienceQA), loaded with datasets.load_dataset."""
    from .download import finished_download
    from .sample import ensure_sample

    if not raw_dir:
        return finished_download(dataset) or ensure_sample() / dataset
    if str(raw_dir).startswith(HUB_PREFIX):
        from datasets import load_dataset

        return load_dataset(str(raw_dir)[len(HUB_PREFIX):])
    return Path(raw_dir)


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
    processed_dir = processed_root(processed_dir)
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

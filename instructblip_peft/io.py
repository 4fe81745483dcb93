"""Writing files and directories so that a kill, a full disk or a read-only directory never leaves a
half-written one: write to a temporary name in the same directory, fsync, then rename over the target.

Directories cannot be renamed over a non-empty directory, so `atomic_dir` writes `<name>.tmp/`, moves the
old `<name>/` aside to `<name>.old/`, renames the new one into place and only then deletes the old one;
`complete_dir` falls back to `<name>.old/` when a kill hit between the two renames."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path, what: str = "file"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a fresh temporary directory beside `path`; on success it replaces `path` as a whole (complete
    old or complete new, never a mix); on error it is removed and `path` is left as it was."""
    path = Path(path)
    tmp, old = _tmp_dir(path), _old_dir(path)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        _fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():  # the rename of the new one failed: put the old one back
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def complete_dir(path: str | os.PathLike, marker: str) -> Path | None:
    """`path` if it holds `marker` (the file written last), else the previous version a kill left in
    `<name>.old/`, else None."""
    path = Path(path)
    for candidate in (path, _old_dir(path)):
        if (candidate / marker).is_file():
            return candidate
    return None


def remove_dir(path: str | os.PathLike) -> None:
    """Remove `path` and what an interrupted atomic_dir may have left beside it."""
    path = Path(path)
    for p in (path, _old_dir(path), _tmp_dir(path)):
        shutil.rmtree(p, ignore_errors=True)


def _tmp_dir(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _old_dir(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

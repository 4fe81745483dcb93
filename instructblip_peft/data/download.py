"""`instructblip-peft download {scienceqa,iconqa}`: the raw data from its official sources (params/download.yaml)
into <raw_dir>/<dataset>/ (params/paths.yaml), in the layout the readers in data/ expect.

- Each file downloads to `<name>.part` in `<root>/.<dataset>.download/`. An interrupted transfer keeps the
  `.part` and resumes with an HTTP Range request, within the call (`retries`) or on the next call. A server
  that ignores Range sends the whole file again, which replaces the `.part`.
- A file's size is checked against the server's Content-Length (and against `size` where params/ gives one),
  its SHA-256 against `sha256` where given; the SHA-256 of every file is recorded in DOWNLOAD.json.
- Archives are unpacked into a temporary folder beside the destination, the expected layout is checked, and
  the folder is then renamed into place: <root>/<dataset>/ is either absent or complete. A damaged archive
  is one error naming it; it is deleted (it was complete, so there is nothing to resume) and nothing is
  unpacked.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..config import load_yaml, path_setting
from ..errors import UserError

MARKER = "DOWNLOAD.json"   # written last into a finished download; preprocess looks for it
CHUNK = 1 << 20
LOCK = ".lock"
PARAMS = "download.yaml"


# ---------------------------------------------------------------- settings

def _settings() -> dict:
    s = load_yaml(PARAMS)
    timeout, retries = s.get("timeout_s"), s.get("retries")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise UserError(f"params/{PARAMS}: 'timeout_s' must be a positive number of seconds, got {timeout!r}")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise UserError(f"params/{PARAMS}: 'retries' must be a non-negative integer, got {retries!r}")
    if not isinstance(s.get("datasets"), dict) or not s["datasets"]:
        raise UserError(f"params/{PARAMS}: 'datasets' must map dataset names to their files")
    return s


def datasets() -> list[str]:
    return list(_settings()["datasets"])


def _check_url(url, where: str) -> str:
    if not isinstance(url, str) or not re.match(r"https?://[^/\s]+", url):
        raise UserError(f"{where}: expected an http:// or https:// URL, got {url!r}")
    return url


def _relative(path, where: str) -> str:
    p = PurePosixPath(str(path))
    if not isinstance(path, str) or not path or p.is_absolute() or ".." in p.parts:
        raise UserError(f"{where}: expected a relative path inside the dataset folder, got {path!r}")
    return path


def _spec(dataset: str) -> dict:
    """The dataset's files and expected paths, validated."""
    all_specs = _settings()["datasets"]
    if dataset not in all_specs:
        raise UserError(f"no download for '{dataset}'. Downloadable datasets: {', '.join(all_specs)}"
                        + (" (custom data: preprocess custom --raw DIR)" if dataset == "custom" else ""))
    spec = all_specs[dataset]
    where = f"params/{PARAMS}: {dataset}"
    if not isinstance(spec, dict) or not isinstance(spec.get("files"), list) or not spec["files"]:
        raise UserError(f"{where}: expected 'files', a non-empty list")
    files = []
    for i, f in enumerate(spec["files"], 1):
        w = f"{where} file {i}"
        if not isinstance(f, dict):
            raise UserError(f"{w}: expected a mapping with url and name")
        unknown = set(f) - {"url", "name", "save_as", "extract", "size", "sha256"}
        if unknown:
            raise UserError(f"{w}: unknown key(s) {', '.join(sorted(unknown))}")
        _check_url(f.get("url"), w)
        name = f.get("name")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise UserError(f"{w}: 'name' must be a plain file name, got {name!r}")
        if ("save_as" in f) == ("extract" in f):
            raise UserError(f"{w}: give exactly one of 'save_as' and 'extract'")
        _relative(f.get("save_as", f.get("extract")), w)
        if f.get("size") is not None and (not isinstance(f["size"], int) or isinstance(f["size"], bool)
                                          or f["size"] <= 0):
            raise UserError(f"{w}: 'size' must be a positive number of bytes, got {f['size']!r}")
        if f.get("sha256") is not None and not (isinstance(f["sha256"], str)
                                                and re.fullmatch(r"[0-9a-f]{64}", f["sha256"])):
            raise UserError(f"{w}: 'sha256' must be 64 lower-case hex digits, in quotes")
        files.append(dict(f))
    if len({f["name"] for f in files}) != len(files):
        raise UserError(f"{where}: two files share a name")
    expect = spec.get("expect") or []
    if not isinstance(expect, list):
        raise UserError(f"{where}: 'expect' must be a list of paths")
    return {"files": files, "expect": [_relative(e, f"{where} expect") for e in expect]}


def _with_url(files: list[dict], url: str | None) -> list[dict]:
    """--url: a dataset of one file takes it as that file's URL; a dataset of several (ScienceQA) takes it as
    a folder URL holding them under their names (problems.json, pid_splits.json, train.zip, ...)."""
    if url is None:
        return files
    _check_url(url, "--url")
    if len(files) == 1:
        return [{**files[0], "url": url}]
    base = url.rstrip("/") + "/"
    return [{**f, "url": base + f["name"]} for f in files]


def raw_root(dest=None) -> Path:
    return Path(dest).expanduser().resolve() if dest else path_setting("raw_dir")


# ---------------------------------------------------------------- what preprocess uses

def finished_download(dataset: str, dest=None) -> Path | None:
    """<raw_dir>/<dataset> when it holds a finished download (its DOWNLOAD.json), else None."""
    d = raw_root(dest) / dataset
    return d if (d / MARKER).is_file() else None


def default_source_line(dataset: str) -> str:
    """One line saying which raw data `preprocess DATASET` without --raw reads."""
    found = finished_download(dataset)
    if found:
        return f"raw data: the download in {found}"
    d = raw_root() / dataset
    why = (f"{d} is not a finished download (no {MARKER}): pass --raw {d} to use it as is" if d.exists()
           else f"no download in {d}: `instructblip-peft download {dataset}` fetches the real data")
    return f"raw data: the bundled sample in {path_setting('sample_raw_dir') / dataset} ({why})"


# ---------------------------------------------------------------- one file

class _Interrupted(Exception):
    def __init__(self, have: int, total: int | None, why: str):
        super().__init__(why)
        self.have, self.total, self.why = have, total, why


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header: 'bytes 100-199/200' or 'bytes */200'."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError) or "timed out" in str(e):
        return "no data from the server within the timeout"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _transfer(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> None:
    """Bring `part` to the whole file, resuming from its current length. Raises _Interrupted (the part keeps
    what arrived) or UserError."""
    from tqdm.auto import tqdm

    for _ in range(3):  # at most: a refused range, then a whole-file transfer
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        headers = {"User-Agent": "instructblip-peft", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and have:  # the range starts at or past the end
                _, total = _content_range(e.headers.get("Content-Range"))
                if total == have and size in (None, have):
                    return  # the part was already whole
                part.unlink()  # longer than the server's file, or no size given: start over
                continue
            raise UserError(f"{url}: HTTP {e.code} {e.reason}"
                            + (f" (the partial file {part} is kept)" if have else "")) from None
        except urllib.error.URLError as e:
            raise _Interrupted(have, None, f"cannot connect: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Interrupted(have, None, _why(e)) from None
        with resp:
            length = resp.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            if resp.status == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != have:  # some other range: unusable, fetch the whole file
                    part.unlink()
                    continue
                mode = "ab"
            else:  # 200: the whole file (the server ignored Range, or none was asked)
                have, total, mode = 0, length, "wb"
            if size is not None and total is not None and total != size:
                raise UserError(f"{url}: the server's file has {total:,} bytes, not the {size:,} of params/{PARAMS}")
            bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=part.stem,
                       disable=not progress, leave=False)
            try:
                with open(part, mode) as f:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except (OSError, http.client.HTTPException) as e:
                            raise _Interrupted(have, total, _why(e)) from None
                        if not chunk:
                            break
                        f.write(chunk)
                        have += len(chunk)
                        bar.update(len(chunk))
            except OSError as e:
                raise UserError(f"cannot write {part}: {e.strerror or e}") from None
            finally:
                bar.close()
        if total is not None and have < total:
            raise _Interrupted(have, total, "the connection closed early")
        if total is not None and have > total:
            part.unlink()
            raise UserError(f"{url}: the server sent {have:,} bytes, more than the {total:,} it announced")
        if size is not None and have != size:
            raise _Interrupted(have, size, "the server's file ended early")
        return
    raise UserError(f"{url}: the server answers the resume request inconsistently; delete {part} and run again")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, target: Path, *, size: int | None = None, sha256: str | None = None, timeout: float = 60,
          retries: int = 0, progress: bool = True) -> Path:
    """Download `url` to `target` through `target.part`, resuming an earlier partial transfer."""
    part = target.with_name(target.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, size, timeout, progress)
            break
        except _Interrupted as e:
            if attempt == retries:
                if not e.have:
                    raise UserError(f"{target.name}: cannot download {url} ({e.why})") from None
                of = f" of {e.total:,}" if e.total else ""
                raise UserError(f"{target.name}: download from {url} interrupted after {e.have:,}{of} bytes "
                                f"({e.why}); {part} is kept: run the same command again to resume") from None
            time.sleep(min(attempt + 1, 10))
    if sha256 is not None:
        got = _sha256(part)
        if got != sha256:
            part.unlink()  # whole but wrong: nothing to resume
            raise UserError(f"{target.name}: SHA-256 {got} differs from the {sha256} of params/{PARAMS} "
                            f"(download from {url}); the file was deleted")
    os.replace(part, target)
    return target


# ---------------------------------------------------------------- archives

class _BadArchive(Exception):
    pass


ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


def _short(e: BaseException) -> str:
    text = str(e)
    return text if text and text.isprintable() and len(text) <= 120 else type(e).__name__


def _extract(archive: Path, into: Path) -> None:
    """Unzip `archive` into `into`, refusing unsafe member paths; CRCs are checked while unpacking."""
    try:
        zf = zipfile.ZipFile(archive)
    except ZIP_ERRORS as e:
        raise _BadArchive(_short(e)) from None
    with zf:
        members = zf.infolist()
        for info in members:
            p = PurePosixPath(info.filename)
            if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", info.filename):
                raise _BadArchive(f"unsafe entry path {info.filename!r}")
        into.mkdir(parents=True, exist_ok=True)
        for info in members:
            try:
                zf.extract(info, into)
            except ZIP_ERRORS as e:
                raise _BadArchive(f"entry {info.filename} is damaged: {_short(e)}") from None


# ---------------------------------------------------------------- a dataset

@contextlib.contextmanager
def _locked(cache: Path, dataset: str):
    import fcntl

    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write in {cache.parent}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another download of {dataset} into {cache.parent} is running") from None
        yield
    finally:
        os.close(fd)


def _tidy(cache: Path) -> None:
    """Remove the download folder when nothing worth keeping (a .part or a verified file) is left in it."""
    if cache.is_dir() and all(p.name == LOCK for p in cache.iterdir()):
        shutil.rmtree(cache, ignore_errors=True)


def download(dataset: str, dest=None, url: str | None = None, *, retries: int | None = None,
             progress: bool = True, log=print) -> Path:
    """Fetch `dataset` into <dest or raw_dir>/<dataset>/ and return that folder. A finished download is
    left as it is; a folder there that is not one is never overwritten."""
    spec = _spec(dataset)
    settings = _settings()
    files = _with_url(spec["files"], url)
    retries = settings["retries"] if retries is None else retries
    root = raw_root(dest)
    final = root / dataset
    if (final / MARKER).is_file():
        log(f"{dataset}: already downloaded in {final} (delete that folder to download again)")
        return final
    if final.exists():
        raise UserError(f"{final} exists but is not a finished download (no {MARKER}): move it away, or pass "
                        f"another --dest")
    cache = root / f".{dataset}.download"
    with _locked(cache, dataset):
        if (final / MARKER).is_file():  # another process finished it meanwhile
            return final
        for stale in root.glob(f".{dataset}.partial-*"):  # left by a killed process; the lock says none runs
            shutil.rmtree(stale, ignore_errors=True)
        try:
            records = []
            for f in files:
                target = cache / f["name"]
                if target.is_file():
                    log(f"{dataset}: {f['name']} already downloaded")
                else:
                    log(f"{dataset}: {f['name']} from {f['url']}")
                    fetch(f["url"], target, size=f.get("size"), sha256=f.get("sha256"),
                          timeout=settings["timeout_s"], retries=retries, progress=progress)
                records.append({"name": f["name"], "url": f["url"], "bytes": target.stat().st_size,
                                "sha256": _sha256(target)})
            _assemble(dataset, files, records, spec["expect"], cache, root, final, log)
            shutil.rmtree(cache, ignore_errors=True)  # the archives are unpacked, the files copied
        finally:
            _tidy(cache)
    return final


def _assemble(dataset: str, files: list[dict], records: list[dict], expect: list[str], cache: Path, root: Path,
              final: Path, log) -> None:
    """Unpack and place every file in a temporary folder beside `final`, check it, rename it into place."""
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{dataset}.partial-", dir=root))
    except OSError as e:
        raise UserError(f"cannot write in {root}: {e.strerror or e}") from None
    try:
        for f in files:
            source = cache / f["name"]
            if "extract" in f:
                log(f"{dataset}: unpacking {f['name']}")
                try:
                    _extract(source, work / f["extract"])
                except _BadArchive as e:
                    source.unlink()  # it was complete: a fresh download is the only remedy
                    raise UserError(f"{f['name']} (from {f['url']}) is not a valid zip archive ({e}): deleted it, "
                                    f"nothing was written to {final}; run the command again to download it "
                                    f"afresh") from None
            else:
                (work / f["save_as"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, work / f["save_as"])
        missing = [e for e in expect if not (work / e).exists()]
        if missing:
            for f in files:
                (cache / f["name"]).unlink(missing_ok=True)
            raise UserError(f"the files downloaded for {dataset} lack {', '.join(missing)} (a wrong --url?): "
                            f"deleted them, nothing was written to {final}")
        (work / MARKER).write_text(json.dumps({"dataset": dataset, "files": records}, indent=2) + "\n")
        os.rename(work, final)
    except OSError as e:
        raise UserError(f"cannot write {final}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)

"""`instructblip-peft download` against a local HTTP server (127.0.0.1) serving the bundled sample packed as the
official downloads: ScienceQA's problems.json, pid_splits.json and images/{train,val,test}.zip, IconQA's
iconqa_data.zip. Resume after a cut connection (HTTP Range), a server that ignores Range, damaged archives,
and preprocess finding the download without --raw."""
from __future__ import annotations

import hashlib
import io
import re
import shutil
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from instructblip_peft import cli
from instructblip_peft.data.preprocess import raw_source
from instructblip_peft.data.sample import generate_sample
from instructblip_peft.data.download import MARKER, default_source_line, download, finished_download
from instructblip_peft.errors import UserError

PARAMS = Path(__file__).resolve().parent.parent / "params"
SQA_JSON = "/gh/lupantech/ScienceQA/main/data/scienceqa/"   # where the official URLs' paths go on the server
SQA_IMAGES = "/s3-scienceqa/images/"
ICONQA = "/s3-iconqa/iconqa_data.zip"
SERVER_LIFETIME_S = 120  # the server shuts itself down after this, whatever happens to the test


# ---------------------------------------------------------------- the official downloads, from the sample

def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(entries.items()):
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The bundled sample (a smaller draw of it) and its files packed as the official downloads."""
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_scienceqa=120, n_iconqa=80)
    sqa, iconqa = root / "scienceqa", root / "iconqa"
    files = {SQA_JSON + "problems.json": (sqa / "problems.json").read_bytes(),
             SQA_JSON + "pid_splits.json": (sqa / "pid_splits.json").read_bytes()}
    for split in ("train", "val", "test"):  # each archive holds <split>/<pid>/image.png, unpacked in images/
        files[f"{SQA_IMAGES}{split}.zip"] = _zip({f"{split}/{k}": v
                                                  for k, v in _tree(sqa / "images" / split).items()})
    # iconqa_data.zip holds iconqa_data/ (problems.json, pid_splits.json, pid2skills.json, iconqa/...)
    files[ICONQA] = _zip({f"iconqa_data/{k}": v for k, v in _tree(iconqa / "iconqa_data").items()})
    expected = {"scienceqa": {k: v for k, v in _tree(sqa).items() if k != "SAMPLE.txt"},
                "iconqa": {k: v for k, v in _tree(iconqa).items() if k != "SAMPLE.txt"}}
    return {"files": files, "expected": expected}


# ---------------------------------------------------------------- the server

class Server:
    """A threaded HTTP server on 127.0.0.1 with Range support. `cut[path] = n` sends only n bytes of the next
    response for path and closes the connection; `ignore_range` answers every request with the whole file."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut, self.ignore_range, self.requests = dict(files), {}, False, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, m = 0, re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and not outer.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if self.path in outer.cut:
                    body = body[:outer.cut.pop(self.path)]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.watchdog = threading.Timer(SERVER_LIFETIME_S, self.httpd.shutdown)
        self.watchdog.daemon = True

    def __enter__(self):
        self.thread.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc):
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(sample):
    with Server(sample["files"]) as s:
        yield s


@pytest.fixture
def local_params(tmp_path, monkeypatch, server):
    """params/ with the official hosts replaced by the local server (same paths), and a fresh work dir, so
    the default raw_dir is empty."""
    dst = tmp_path / "params"
    shutil.copytree(PARAMS, dst)
    text = (dst / "download.yaml").read_text()
    for official, local in (("https://raw.githubusercontent.com/lupantech/ScienceQA/main/data/scienceqa/", SQA_JSON),
                            ("https://scienceqa.s3.us-west-1.amazonaws.com/images/", SQA_IMAGES),
                            ("https://iconqa2021.s3.us-west-1.amazonaws.com/iconqa_data.zip", ICONQA)):
        assert official in text
        text = text.replace(official, server.url + local)
    (dst / "download.yaml").write_text(text)
    monkeypatch.setenv("INSTRUCTBLIP_PEFT_PARAMS", str(dst))
    monkeypatch.setenv("INSTRUCTBLIP_PEFT_WORKDIR", str(tmp_path / "work"))
    return dst


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------- tests

def test_download_from_the_official_urls_then_preprocess_finds_it(local_params, tmp_path, server, sample, capsys):
    assert cli.main(["download", "scienceqa"]) == 0
    final = tmp_path / "work" / "data" / "raw" / "scienceqa"
    out = capsys.readouterr().out
    assert f"data in {final}; next: instructblip-peft preprocess scienceqa\n" in out
    got = _tree(final)
    record = got.pop(MARKER)
    assert got == sample["expected"]["scienceqa"]  # images/{split}/<pid>/image.png, as the reader wants
    for name in ("problems.json", "pid_splits.json", "train.zip", "val.zip", "test.zip"):
        path = next(p for p in sample["files"] if p.endswith("/" + name))
        assert hashlib.sha256(sample["files"][path]).hexdigest().encode() in record
    assert sorted(p.name for p in final.parent.iterdir()) == ["scienceqa"]  # no archive, .part or temp left
    assert {p for p, _ in server.requests} == {p for p in sample["files"] if "iconqa" not in p}

    # Once finished, a second call fetches nothing.
    n = len(server.requests)
    assert cli.main(["download", "scienceqa"]) == 0
    assert "already downloaded" in capsys.readouterr().out and len(server.requests) == n

    # preprocess without --raw reads the download and says so; IconQA, not downloaded, is still the sample.
    assert raw_source("scienceqa", "") == final == finished_download("scienceqa")
    assert "bundled sample" in default_source_line("iconqa") and "download iconqa" in default_source_line("iconqa")
    assert cli.main(["preprocess", "scienceqa", "--processed", str(tmp_path / "processed")]) == 0
    out = capsys.readouterr().out
    assert f"scienceqa: raw data: the download in {final}\n" in out
    assert (tmp_path / "processed" / "scienceqa" / "manifest.json").is_file()


def test_a_cut_connection_is_resumed_by_the_next_call(tmp_path, server, sample):
    data = sample["files"][ICONQA]
    n = len(data) // 3
    server.cut[ICONQA] = n
    with pytest.raises(UserError, match=rf"interrupted after {n:,} of {len(data):,} bytes .*kept: run the same "
                                        r"command again to resume"):
        download("iconqa", tmp_path, server.url + ICONQA, retries=0, progress=False)
    part = tmp_path / ".iconqa.download" / "iconqa_data.zip.part"
    assert part.read_bytes() == data[:n]  # the partial download stays, and nothing else
    assert not (tmp_path / "iconqa").exists() and not list(tmp_path.glob(".iconqa.partial-*"))

    final = download("iconqa", tmp_path, server.url + ICONQA, retries=0, progress=False)
    assert server.requests[-1] == (ICONQA, f"bytes={n}-")
    got = _tree(final)
    got.pop(MARKER)
    assert got == sample["expected"]["iconqa"]
    assert hashlib.sha256(data).hexdigest() in (final / MARKER).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iconqa"]


def test_a_part_that_is_already_whole_is_not_fetched_again(tmp_path, server, sample):
    """Killed after the last byte but before the rename: the resume request is past the end (416)."""
    data = sample["files"][ICONQA]
    (tmp_path / ".iconqa.download").mkdir()
    (tmp_path / ".iconqa.download" / "iconqa_data.zip.part").write_bytes(data)
    final = download("iconqa", tmp_path, server.url + ICONQA, retries=0, progress=False)
    assert server.requests == [(ICONQA, f"bytes={len(data)}-")]
    assert (final / "iconqa_data" / "problems.json").is_file()


def test_a_cut_within_one_call_is_resumed_by_its_retries(tmp_path, server, sample):
    server.cut[ICONQA] = 1000
    final = download("iconqa", tmp_path, server.url + ICONQA, retries=1, progress=False)
    assert server.requests == [(ICONQA, None), (ICONQA, "bytes=1000-")]
    got = _tree(final)
    got.pop(MARKER)
    assert got == sample["expected"]["iconqa"]


def test_a_server_that_ignores_range_restarts_the_file_cleanly(tmp_path, server, sample):
    n = len(sample["files"][ICONQA]) // 2
    server.cut[ICONQA] = n
    with pytest.raises(UserError, match="interrupted"):
        download("iconqa", tmp_path, server.url + ICONQA, retries=0, progress=False)
    server.ignore_range = True
    final = download("iconqa", tmp_path, server.url + ICONQA, retries=0, progress=False)
    assert server.requests[-1] == (ICONQA, f"bytes={n}-")  # asked to resume, got the whole file
    got = _tree(final)
    got.pop(MARKER)
    assert got == sample["expected"]["iconqa"]


@pytest.mark.parametrize("damage", ["flipped bytes", "bad data", "truncated"])
def test_a_damaged_archive_is_one_error_and_leaves_nothing(tmp_path, server, sample, capsys, damage):
    data = bytearray(sample["files"][ICONQA])
    if damage == "flipped bytes":  # same size: only the archive's own checks can tell
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    elif damage == "bad data":  # one byte inside an entry's compressed data (a CRC or inflate error)
        info = max(zipfile.ZipFile(io.BytesIO(data)).infolist(), key=lambda i: i.compress_size)
        at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2
        data[at] ^= 0xFF
    else:  # served whole as a shorter file, so the transfer itself looks complete
        data = data[:len(data) * 2 // 3]
    server.files[ICONQA] = bytes(data)
    dest = tmp_path / "raw"
    assert cli.main(["download", "iconqa", "--dest", str(dest), "--url", server.url + ICONQA]) == 2
    line = _one_error_line(capsys)
    assert "iconqa_data.zip (from http://127.0.0.1:" in line and "is not a valid zip archive" in line
    assert list(dest.iterdir()) == []  # nothing unpacked, no temporary folder, the bad archive deleted

    server.files[ICONQA] = sample["files"][ICONQA]  # the next call downloads it afresh
    assert cli.main(["download", "iconqa", "--dest", str(dest), "--url", server.url + ICONQA]) == 0
    assert (dest / "iconqa" / "iconqa_data" / "problems.json").is_file()


def test_an_archive_without_the_expected_layout_is_refused(tmp_path, server, capsys):
    server.files["/other.zip"] = _zip({"something/else.txt": b"x"})
    assert cli.main(["download", "iconqa", "--dest", str(tmp_path), "--url", server.url + "/other.zip"]) == 2
    assert "lack iconqa_data/problems.json" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_checksum_in_params_is_checked(local_params, tmp_path, sample, capsys):
    text = (local_params / "download.yaml").read_text()
    (local_params / "download.yaml").write_text(text.replace("name: iconqa_data.zip,",
                                                             f"name: iconqa_data.zip, sha256: '{'0' * 64}',"))
    assert cli.main(["download", "iconqa"]) == 2
    assert "SHA-256" in _one_error_line(capsys)
    right = hashlib.sha256(sample["files"][ICONQA]).hexdigest()
    (local_params / "download.yaml").write_text(text.replace("name: iconqa_data.zip,",
                                                             f"name: iconqa_data.zip, sha256: '{right}',"))
    assert cli.main(["download", "iconqa"]) == 0


@pytest.mark.parametrize("args,message", [
    (["download", "custom"], "no download for 'custom'"),
    (["download", "iconqa", "--url", "ftp://example.org/x.zip"], "--url: expected an http:// or https:// URL"),
    (["download", "iconqa", "--url", "{server}/missing.zip"], "HTTP 404"),
    (["download", "iconqa", "--url", "{closed}/x.zip"], "cannot download"),
])
def test_bad_input_is_one_line(tmp_path, server, capsys, args, message, monkeypatch):
    monkeypatch.setenv("INSTRUCTBLIP_PEFT_WORKDIR", str(tmp_path))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    args = [a.replace("{server}", server.url).replace("{closed}", closed) for a in args]
    assert cli.main(args) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "data" / "raw" / "iconqa").exists()


def test_a_folder_that_is_not_a_download_is_never_overwritten(tmp_path, server, capsys):
    (tmp_path / "iconqa").mkdir()
    (tmp_path / "iconqa" / "mine.txt").write_text("keep")
    assert cli.main(["download", "iconqa", "--dest", str(tmp_path), "--url", server.url + ICONQA]) == 2
    assert "is not a finished download" in _one_error_line(capsys)
    assert (tmp_path / "iconqa" / "mine.txt").read_text() == "keep" and server.requests == []

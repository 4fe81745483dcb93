"""The generated sample: deterministic, in the raw layouts, and its image answers readable off the image."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from instructblip_peft.data.preprocess import preprocess
from instructblip_peft.data.records import load_split
from instructblip_peft.data.sample import COLOURS, ensure_sample, generate_sample


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate_sample(tmp_path / "a", seed=3, n_scienceqa=30, n_iconqa=20)
    generate_sample(tmp_path / "b", seed=3, n_scienceqa=30, n_iconqa=20)
    generate_sample(tmp_path / "c", seed=4, n_scienceqa=30, n_iconqa=20)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c
    assert any(name.endswith(".png") for name in a)


def test_scienceqa_sample_layout_and_spread(tmp_path):
    raw = generate_sample(tmp_path, n_scienceqa=60, n_iconqa=10)["scienceqa"]
    problems = json.loads((raw / "problems.json").read_text())
    splits = json.loads((raw / "pid_splits.json").read_text())
    assert set(splits) == {"train", "val", "test", "trainval", "minitrain", "minival", "minitest"}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [36, 12, 12]
    for pid, p in problems.items():
        assert 2 <= len(p["choices"]) <= 5 and 0 <= p["answer"] < len(p["choices"])
        assert p["split"] in ("train", "val", "test") and pid in splits[p["split"]]
        if p["image"]:
            assert (raw / "images" / p["split"] / pid / p["image"]).is_file()
    assert {p["subject"] for p in problems.values()} == {"natural science", "social science", "language science"}
    assert any(p["image"] is None for p in problems.values())
    assert len({p["grade"] for p in problems.values()}) > 3
    assert len({p["answer"] for p in problems.values()}) > 2  # the answer position is shuffled
    # A small closed vocabulary of answers, recurring across questions, so a tiny model can learn it.
    assert len({c for p in problems.values() for c in p["choices"]}) <= 30


def _dominant_colour(im: Image.Image) -> str:
    pixels = [px for px in im.convert("RGB").getdata() if px != (255, 255, 255)]
    mean = [sum(ch) / len(pixels) for ch in zip(*pixels)]
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], mean)))


def _centre_x(im: Image.Image) -> float:
    im = im.convert("RGB")
    xs = [x for y in range(im.height) for x in range(im.width) if im.getpixel((x, y)) != (255, 255, 255)]
    return sum(xs) / len(xs) / im.width


def test_image_answers_are_read_off_the_image(tmp_path):
    raw = generate_sample(tmp_path / "raw", n_scienceqa=80, n_iconqa=40)
    preprocess("iconqa", raw["iconqa"], tmp_path / "proc", progress=False)
    records, root = load_split(tmp_path / "proc" / "iconqa", "train")
    seen = {"colour": set(), "side": set()}
    for r in records:
        answer = r["choices"][r["answer_index"]]
        with Image.open(root / r["image"]) as im:
            if r["question"] == "What color is the shape?":
                assert _dominant_colour(im) == answer
                seen["colour"].add(answer)
            elif r["question"] == "Is the circle on the left or the right?":
                assert (_centre_x(im) < 0.5) == (answer == "left")
                seen["side"].add(answer)
    assert len(seen["colour"]) > 2 and seen["side"] == {"left", "right"}


def test_ensure_sample_generates_once(tmp_path):
    root = ensure_sample(tmp_path / "sample")
    assert (root / "scienceqa" / "problems.json").is_file()
    assert (root / "iconqa" / "iconqa_data" / "problems.json").is_file()
    marker = root / "scienceqa" / "problems.json"
    before = marker.stat().st_mtime_ns
    ensure_sample(tmp_path / "sample")
    assert marker.stat().st_mtime_ns == before

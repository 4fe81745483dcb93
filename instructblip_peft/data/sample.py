"""A small generated stand-in for the ScienceQA and IconQA downloads, in their exact raw layouts.

Images are drawn with PIL (shapes, colours, counts, positions) and every image question's answer is a
function of the image alone, with a small closed vocabulary of answers (colours, shape names, numbers,
left/right, top/bottom) that recurs across questions, so a tiny model can learn it and beat chance.
The same seed gives byte-identical files; nothing binary is committed, the sample is made in seconds.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..config import path_setting
from ..errors import UserError
from ..io import atomic_dir

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 0),
    "purple": (140, 40, 170), "orange": (250, 130, 0), "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle", "star")
OPPOSITES = {"hot": "cold", "cold": "hot", "big": "small", "small": "big", "left": "right", "right": "left",
             "top": "bottom", "bottom": "top", "north": "south", "south": "north", "east": "west", "west": "east"}
SCIENCEQA_GRADES = tuple(f"grade{i}" for i in range(1, 13))
ICONQA_GRADES = ("prek", "kindergarten") + tuple(f"grade{i}" for i in range(1, 7))

# kind -> (subject, topic, category, skill, lecture): ScienceQA metadata, spread over the three subjects.
SCIENCEQA_KINDS = {
    "colour": ("natural science", "physics", "Identify colors", "Identify the color of an object",
               "Color is a property of an object. Red, blue and green are colors."),
    "shape": ("natural science", "geometry", "Identify shapes", "Identify two-dimensional shapes",
              "A shape is a property of an object. A circle is round; a square has four equal sides."),
    "count": ("natural science", "math", "Count objects", "Count shapes in a picture",
              "To count, point at each object once and say the next number."),
    "left_right": ("social science", "geography", "Read a map", "Use left and right on a map",
                   "Left and right describe where something is in a picture."),
    "top_bottom": ("social science", "geography", "Read a map", "Use top and bottom on a map",
                   "Top and bottom describe where something is in a picture."),
    "hint_colour": ("natural science", "physics", "Use context", "Find a color in a text",
                    "A text can tell you the color of an object."),
    "opposite": ("language science", "vocabulary", "Antonyms", "Choose the antonym",
                 "Antonyms are words with opposite meanings, like hot and cold."),
}
# Colour questions dominate: they are the ones a tiny random model learns from its images within a minute of
# CPU training (shape, count and position need more data and passes than a test or the demo can spend).
SCIENCEQA_WEIGHTS = {"colour": 8, "shape": 2, "count": 2, "left_right": 2, "top_bottom": 1, "hint_colour": 2,
                     "opposite": 3}
ICONQA_KINDS = {"colour": ["scene"], "shape": ["geometry"], "count": ["counting"], "left_right": ["spatial"],
                "top_bottom": ["spatial"]}
ICONQA_LABELS = {"colour": "C1", "shape": "G2", "count": "A3", "left_right": "S4", "top_bottom": "S5"}
ICONQA_WEIGHTS = {"colour": 4, "shape": 1, "count": 1, "left_right": 1, "top_bottom": 1}  # see SCIENCEQA_WEIGHTS


# ---- drawing --------------------------------------------------------------------------------------

def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    import math

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(shape)


def _image(items: list[tuple[str, str, float, float, float]]):
    """items: (shape, colour, cx, cy, r) on a white square."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for shape, colour, cx, cy, r in items:
        _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
    return im


def _png(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ---- questions ------------------------------------------------------------------------------------

def _choices(rng: random.Random, answer: str, pool, k: int) -> tuple[list[str], int]:
    others = [c for c in pool if c != answer]
    picked = rng.sample(others, min(k - 1, len(others))) + [answer]
    rng.shuffle(picked)
    return picked, picked.index(answer)


def _image_question(rng: random.Random, kind: str):
    """(question, choices, answer_index, image, answer word) with the answer read off the image."""
    c = IMAGE_SIZE / 2
    jitter = lambda a: rng.uniform(-a, a)  # noqa: E731
    if kind == "colour":
        colour = rng.choice(list(COLOURS))
        im = _image([(rng.choice(SHAPES), colour, c + jitter(4), c + jitter(4), rng.uniform(20, 26))])
        choices, ans = _choices(rng, colour, list(COLOURS), rng.randint(2, 5))
        return "What color is the shape?", choices, ans, im
    if kind == "shape":
        shape = rng.choice(SHAPES)
        im = _image([(shape, rng.choice(list(COLOURS)), c + jitter(4), c + jitter(4), rng.uniform(20, 26))])
        choices, ans = _choices(rng, shape, SHAPES, rng.randint(2, 4))
        return "Which shape is shown in the picture?", choices, ans, im
    if kind == "count":
        n = rng.randint(1, 4)
        cells = rng.sample([(16, 16), (48, 16), (16, 48), (48, 48)], n)
        colour = rng.choice(list(COLOURS))
        im = _image([("star", colour, x + jitter(2), y + jitter(2), 13) for x, y in cells])
        choices, ans = _choices(rng, str(n), ["1", "2", "3", "4"], rng.randint(2, 4))
        return "How many stars are there?", choices, ans, im
    if kind == "left_right":
        side = rng.choice(["left", "right"])
        x = rng.uniform(12, 18) if side == "left" else rng.uniform(46, 52)
        im = _image([("circle", rng.choice(list(COLOURS)), x, c + jitter(10), rng.uniform(10, 12))])
        choices, ans = _choices(rng, side, ["left", "right"], 2)
        return "Is the circle on the left or the right?", choices, ans, im
    if kind == "top_bottom":
        side = rng.choice(["top", "bottom"])
        y = rng.uniform(12, 18) if side == "top" else rng.uniform(46, 52)
        im = _image([("square", rng.choice(list(COLOURS)), c + jitter(10), y, rng.uniform(10, 12))])
        choices, ans = _choices(rng, side, ["top", "bottom"], 2)
        return "Is the square at the top or the bottom?", choices, ans, im
    raise ValueError(kind)


def _text_question(rng: random.Random, kind: str):
    """(question, choices, answer_index, hint) for a text-only ScienceQA problem."""
    if kind == "hint_colour":
        colour = rng.choice(list(COLOURS))
        choices, ans = _choices(rng, colour, list(COLOURS), rng.randint(2, 5))
        return "What color is the shape?", choices, ans, f"The shape is {colour}."
    if kind == "opposite":
        word = rng.choice(list(OPPOSITES))
        choices, ans = _choices(rng, OPPOSITES[word], [w for w in OPPOSITES if w != word], rng.randint(2, 5))
        return f"Which word is the opposite of {word}?", choices, ans, ""
    raise ValueError(kind)


def _kinds(rng: random.Random, weights: dict, n: int) -> list[str]:
    """n kinds in the given proportions (exact up to rounding), in random order."""
    total = sum(weights.values())
    kinds = [k for k, w in weights.items() for _ in range(round(n * w / total))]
    kinds = (kinds + [k for k in weights] * n)[:n]
    rng.shuffle(kinds)
    return kinds


def _assign_splits(rng: random.Random, pids: list[str]) -> dict[str, list[str]]:
    order = list(pids)
    rng.shuffle(order)
    n_train, n_val = round(len(order) * 0.6), round(len(order) * 0.2)
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# ---- the two datasets -----------------------------------------------------------------------------

def _write_scienceqa(root: Path, rng: random.Random, n: int) -> dict:
    pids = [str(i) for i in range(1, n + 1)]
    kinds = _kinds(rng, SCIENCEQA_WEIGHTS, n)
    splits = _assign_splits(rng, pids)
    split_of = {pid: s for s, ps in splits.items() for pid in ps}
    problems = {}
    for pid, kind in zip(pids, kinds):
        subject, topic, category, skill, lecture = SCIENCEQA_KINDS[kind]
        if kind in ("hint_colour", "opposite"):
            question, choices, ans, hint = _text_question(rng, kind)
            image = None
        else:
            question, choices, ans, im = _image_question(rng, kind)
            hint = rng.choice(["", "", "Look at the picture."])
            image = "image.png"
            path = root / "images" / split_of[pid] / pid / image
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png(im))
        problems[pid] = {
            "question": question, "choices": choices, "answer": ans, "hint": hint, "image": image,
            "task": "closed choice", "grade": rng.choice(SCIENCEQA_GRADES), "subject": subject, "topic": topic,
            "category": category, "skill": skill, "lecture": lecture if rng.random() < 0.7 else "",
            "solution": f"The answer is {choices[ans]}.", "split": split_of[pid],
        }
    pid_splits = dict(splits)
    pid_splits["trainval"] = splits["train"] + splits["val"]
    for s in ("train", "val", "test"):
        pid_splits["mini" + s] = splits[s][: max(1, len(splits[s]) // 10)]
    (root / "problems.json").write_text(_dump(problems))
    (root / "pid_splits.json").write_text(_dump(pid_splits))
    return {s: len(splits[s]) for s in splits}


def _write_iconqa(root: Path, rng: random.Random, n: int, layout: str) -> dict:
    data_dir = root / "iconqa_data"
    pids = [str(i) for i in range(1, n + 1)]
    kinds = _kinds(rng, ICONQA_WEIGHTS, n)
    splits = _assign_splits(rng, pids)
    split_of = {pid: s for s, ps in splits.items() for pid in ps}
    # A few questions of another type, as in the real download, which the reader must leave out.
    other = [str(i) for i in range(n + 1, n + 1 + max(3, n // 20))]
    other_splits = _assign_splits(rng, other)
    problems, skills = {}, {}
    for pid, kind in zip(pids, kinds):
        question, choices, ans, im = _image_question(rng, kind)
        split = split_of[pid]
        entry = {"question": question, "choices": choices, "answer": ans, "ques_type": "choose_txt",
                 "grade": rng.choice(ICONQA_GRADES), "label": ICONQA_LABELS[kind]}
        qdir = data_dir / "iconqa" / split / "choose_txt" / pid
        qdir.mkdir(parents=True, exist_ok=True)
        (qdir / "image.png").write_bytes(_png(im))
        if layout == "per_question":
            (qdir / "data.json").write_text(_dump(entry))
        problems[pid] = {**entry, "split": split, "image": "image.png"}
        if rng.random() < 0.9:  # some questions have no skills entry, as in the real file
            skills[pid] = ICONQA_KINDS[kind]
    for split, ps in other_splits.items():
        for pid in ps:
            entry = {"question": "How many stars are there?", "choices": [], "answer": str(rng.randint(1, 4)),
                     "ques_type": "fill_in_blank", "grade": rng.choice(ICONQA_GRADES), "label": "A3"}
            if layout == "per_question":
                qdir = data_dir / "iconqa" / split / "fill_in_blank" / pid
                qdir.mkdir(parents=True, exist_ok=True)
                (qdir / "data.json").write_text(_dump(entry))
            problems[pid] = {**entry, "split": split, "image": "image.png"}
    if layout == "problems":
        pid_splits = {f"{t}_{s}": (splits if t == "choose_txt" else other_splits)[s]
                      for t in ("choose_txt", "fill_in_blank") for s in ("train", "val", "test")}
        (data_dir / "problems.json").write_text(_dump(problems))
        (data_dir / "pid_splits.json").write_text(_dump(pid_splits))
    (data_dir / "pid2skills.json").write_text(_dump(skills))
    return {s: len(splits[s]) for s in splits}


# Bump when the generator's output changes: ensure_sample then regenerates an older sample instead of
# silently reusing it.
GENERATOR_VERSION = 3
N_SCIENCEQA, N_ICONQA = 1000, 600


def _stamp(seed: int, n: int) -> str:
    return f"generator {GENERATOR_VERSION}, seed {seed}, {n} questions"


def generate_sample(out_dir, seed: int = 0, n_scienceqa: int = N_SCIENCEQA, n_iconqa: int = N_ICONQA,
                    iconqa_layout: str = "problems") -> dict:
    """Write `out_dir/scienceqa/` and `out_dir/iconqa/` as the raw downloads look.

    iconqa_layout: "problems" (iconqa_data/problems.json + pid_splits.json) or "per_question"
    (a data.json beside each image). Each dataset folder is replaced whole, never left half-written.
    Returns {"scienceqa": dir, "iconqa": dir, "counts": {dataset: {split: n}}}.
    """
    if iconqa_layout not in ("problems", "per_question"):
        raise UserError(f"iconqa_layout must be 'problems' or 'per_question', got {iconqa_layout!r}")
    if n_scienceqa < 10 or n_iconqa < 10:
        raise UserError("the sample needs at least 10 questions per dataset (for three non-empty splits)")
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, writer, n in (("scienceqa", _write_scienceqa, n_scienceqa), ("iconqa", _write_iconqa, n_iconqa)):
        # One generator per dataset, so changing one dataset's size leaves the other's files unchanged.
        rng = random.Random(f"{seed}-{name}")
        with atomic_dir(out_dir / name) as work:
            counts[name] = writer(work, rng, n) if name == "scienceqa" else writer(work, rng, n, iconqa_layout)
            (work / "SAMPLE.txt").write_text(
                f"Generated sample ({_stamp(seed, n)}), not the real {name} data. "
                f"Regenerate with instructblip_peft.data.sample.generate_sample.\n")
    return {"scienceqa": out_dir / "scienceqa", "iconqa": out_dir / "iconqa", "counts": counts}


def ensure_sample(raw_root=None, seed: int = 0) -> Path:
    """The sample raw root (paths.yaml `sample_raw_dir` by default), generated there if missing or made by
    another version of the generator."""
    root = Path(path_setting("sample_raw_dir") if raw_root is None else raw_root)
    expected = {"scienceqa": _stamp(seed, N_SCIENCEQA), "iconqa": _stamp(seed, N_ICONQA)}
    complete = (root / "scienceqa" / "problems.json").is_file() and \
        (root / "iconqa" / "iconqa_data" / "pid2skills.json").is_file()
    current = all(stamp in _read(root / name / "SAMPLE.txt") for name, stamp in expected.items())
    if not (complete and current):
        generate_sample(root, seed=seed)
    return root


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""

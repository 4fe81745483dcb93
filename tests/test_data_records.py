"""Raw layouts -> processed records, and bad input: one clear error and nothing processed left behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from instructblip_peft.data.prompts import render_prompt
from instructblip_peft.data.preprocess import preprocess
from instructblip_peft.data.records import load_split
from instructblip_peft.data.sample import generate_sample
from instructblip_peft.errors import UserError


def _png(path: Path, colour=(200, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _problem(question="What color is the shape?", choices=("red", "blue"), answer=1, hint="A hint.",
             lecture="A lecture.", image="image.png", split="train", subject="natural science", **kw):
    return {"question": question, "choices": list(choices), "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": "grade3", "subject": subject, "topic": "physics",
            "category": "Identify colors", "skill": "s", "lecture": lecture, "solution": "", "split": split, **kw}


def scienceqa_raw(root: Path, json_subdir: str = ".", image_parent: str = ".") -> Path:
    """Six problems: two per split with an image, plus one text-only problem in train."""
    problems = {
        "1": _problem(),
        "2": _problem(question="Which shape is shown?", choices=["circle", "square", "star"], answer=0,
                      hint="", lecture="", subject="social science"),
        "3": _problem(image=None, hint="The shape is red.", lecture="", subject="language science"),
        "4": _problem(split="val"), "5": _problem(split="val", hint="", lecture="Only a lecture."),
        "6": _problem(split="test"), "7": _problem(split="test"),
    }
    splits = {"train": ["1", "2", "3"], "val": ["4", "5"], "test": ["6", "7"], "trainval": ["1", "2", "3", "4", "5"],
              "minitrain": ["1"], "minival": ["4"], "minitest": ["6"]}
    jdir = root / json_subdir
    jdir.mkdir(parents=True, exist_ok=True)
    (jdir / "problems.json").write_text(json.dumps(problems))
    (jdir / "pid_splits.json").write_text(json.dumps(splits))
    for pid, p in problems.items():
        if p["image"]:
            _png(root / image_parent / "images" / p["split"] / pid / "image.png")
    return root


def _leftovers(processed: Path) -> list[str]:
    return sorted(p.name for p in processed.iterdir()) if processed.exists() else []


# ---- ScienceQA ------------------------------------------------------------------------------------

def test_scienceqa_records_and_exact_prompt(tmp_path):
    raw = scienceqa_raw(tmp_path / "raw")
    manifest = preprocess("scienceqa", raw, tmp_path / "proc", progress=False)
    assert manifest["counts"] == {"train": 2, "val": 2, "test": 2}
    assert manifest["filtered"]["text_only_skipped"] == {"train": 1, "val": 0, "test": 0}
    records, image_root = load_split(tmp_path / "proc" / "scienceqa", "train")
    r1, r2 = records
    assert r1 == {"question_id": "1", "image": "images/train/1/image.png", "question": "What color is the shape?",
                  "choices": ["red", "blue"], "answer_index": 1, "answer": "(b) blue",
                  "context": "A hint. A lecture.",
                  "meta": {"subject": "natural science", "grade": "grade3", "has_hint": True, "has_image": True,
                           "topic": "physics", "category": "Identify colors"}}
    assert (image_root / r1["image"]).is_file()
    assert render_prompt(r1, "scienceqa") == ("Context: {A hint. A lecture.} Question: {What color is the shape?} "
                                              "Options: {(a) red\n(b) blue\n} Answer:")
    assert r2["context"] == "" and r2["meta"]["has_hint"] is False and r2["answer"] == "(a) circle"
    assert render_prompt(r2, "scienceqa") == ("Context: {} Question: {Which shape is shown?} "
                                              "Options: {(a) circle\n(b) square\n(c) star\n} Answer:")
    val, _ = load_split(tmp_path / "proc" / "scienceqa", "val")
    assert val[1]["context"] == " Only a lecture."  # the original's hint + " " + lecture, kept as is


def test_scienceqa_keep_text_only(tmp_path):
    raw = scienceqa_raw(tmp_path / "raw")
    manifest = preprocess("scienceqa", raw, tmp_path / "proc", keep_text_only=True, progress=False)
    assert manifest["counts"]["train"] == 3 and manifest["options"]["keep_text_only"] is True
    records, _ = load_split(tmp_path / "proc" / "scienceqa", "train")
    text = [r for r in records if r["question_id"] == "3"][0]
    assert text["image"] is None and text["meta"]["has_image"] is False
    assert text["context"] == "The shape is red. "
    assert text["meta"]["subject"] == "language science"


def test_scienceqa_official_repo_layout(tmp_path):
    raw = scienceqa_raw(tmp_path / "raw", json_subdir="data/scienceqa", image_parent="data")
    preprocess("scienceqa", raw, tmp_path / "proc", progress=False)
    records, image_root = load_split(tmp_path / "proc" / "scienceqa", "test")
    assert all((image_root / r["image"]).is_file() for r in records)


def test_scienceqa_not_found_says_where_it_looked(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(UserError) as e:
        preprocess("scienceqa", tmp_path / "raw", tmp_path / "proc", progress=False)
    assert "problems.json not found" in str(e.value) and "data/scienceqa/problems.json" in str(e.value)
    assert _leftovers(tmp_path / "proc") == []


def test_reprocessing_replaces_and_a_failure_keeps_the_previous_result(tmp_path):
    raw = scienceqa_raw(tmp_path / "raw")
    preprocess("scienceqa", raw, tmp_path / "proc", progress=False)
    preprocess("scienceqa", raw, tmp_path / "proc", keep_text_only=True, progress=False)
    assert json.loads((tmp_path / "proc/scienceqa/manifest.json").read_text())["counts"]["train"] == 3
    (raw / "problems.json").write_text("{not json")
    with pytest.raises(UserError):
        preprocess("scienceqa", raw, tmp_path / "proc", progress=False)
    assert _leftovers(tmp_path / "proc") == ["scienceqa"]
    assert len(load_split(tmp_path / "proc" / "scienceqa", "train")[0]) == 3


def test_reprocessing_keeps_other_files_and_removes_a_stale_report(tmp_path):
    raw = scienceqa_raw(tmp_path / "raw")
    (raw / "images/train/2/image.png").unlink()
    preprocess("scienceqa", raw, tmp_path / "proc", skip_invalid=True, progress=False)
    out = tmp_path / "proc" / "scienceqa"
    (out / "01_preprocess.ipynb").write_text("{}")  # e.g. the executed notebook that ran preprocessing
    _png(raw / "images/train/2/image.png")
    preprocess("scienceqa", raw, tmp_path / "proc", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["01_preprocess.ipynb", "manifest.json", "test.json",
                                                     "train.json", "val.json"]
    assert _leftovers(tmp_path / "proc") == ["scienceqa"]


def test_load_split_without_preprocessing_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match=r"instructblip-peft preprocess iconqa --raw DIR"):
        load_split(tmp_path / "processed" / "iconqa", "train")


# ---- IconQA ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["problems", "per_question"])
def test_iconqa_layouts(tmp_path, layout):
    raw = generate_sample(tmp_path / "raw", n_scienceqa=10, n_iconqa=20, iconqa_layout=layout)["iconqa"]
    manifest = preprocess("iconqa", raw, tmp_path / "proc", progress=False)
    assert manifest["counts"] == {"train": 12, "val": 4, "test": 4}  # fill_in_blank questions left out
    problems_layout = layout == "problems"
    assert manifest["layout"] == ("iconqa-problems-json" if problems_layout else "iconqa-per-question")
    records, image_root = load_split(tmp_path / "proc" / "iconqa", "train")
    for r in records:
        assert (image_root / r["image"]).is_file() and r["context"] == ""
        assert set(r["meta"]) == {"grade", "skills"} and isinstance(r["meta"]["skills"], list)
        letters = " ".join(f"({'abcde'[i]}) {c}" for i, c in enumerate(r["choices"]))
        assert render_prompt(r, "iconqa") == f"<Image> Question: {r['question']} Options: {letters}. Short answer:"
        assert r["answer"] == f"({'abcde'[r['answer_index']]}) {r['choices'][r['answer_index']]}"


def test_iconqa_both_layouts_give_the_same_records(tmp_path):
    out = {}
    for layout in ("problems", "per_question"):
        raw = generate_sample(tmp_path / layout, n_scienceqa=10, n_iconqa=15, iconqa_layout=layout)["iconqa"]
        preprocess("iconqa", raw, tmp_path / f"proc-{layout}", progress=False)
        records, root = load_split(tmp_path / f"proc-{layout}" / "iconqa", "test")
        # Image paths are relative to each layout's image root; the files they name are the same.
        out[layout] = sorted(({**r, "image": (root / r["image"]).relative_to(raw).as_posix()} for r in records),
                             key=lambda r: r["question_id"])
    assert out["problems"] == out["per_question"]


def test_iconqa_exact_prompt(tmp_path):
    qdir = tmp_path / "raw" / "iconqa_data" / "iconqa"
    for split in ("train", "val", "test"):
        d = qdir / split / "choose_txt" / "7"
        d.mkdir(parents=True)
        _png(d / "image.png")
        (d / "data.json").write_text(json.dumps({"question": "Which is third?", "choices": ["fish", "sub"],
                                                 "answer": 1, "ques_type": "choose_txt", "grade": "grade1",
                                                 "label": "A25"}))
        break
    for split in ("val", "test"):  # the other splits hold other ids
        d = qdir / split / "choose_txt" / f"{split}8"
        d.mkdir(parents=True)
        _png(d / "image.png")
        (d / "data.json").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0,
                                                 "ques_type": "choose_txt", "grade": "prek", "label": "x"}))
    (tmp_path / "raw" / "iconqa_data" / "pid2skills.json").write_text(json.dumps({"7": ["counting"]}))
    preprocess("iconqa", tmp_path / "raw", tmp_path / "proc", progress=False)
    (r,), _ = load_split(tmp_path / "proc" / "iconqa", "train")
    assert render_prompt(r, "iconqa") == "<Image> Question: Which is third? Options: (a) fish (b) sub. Short answer:"
    assert r["answer"] == "(b) sub" and r["meta"] == {"grade": "grade1", "skills": ["counting"]}
    (v,), _ = load_split(tmp_path / "proc" / "iconqa", "val")
    assert v["meta"]["skills"] == []


# ---- hub schema and custom JSONL ------------------------------------------------------------------

def _hub_split(rows):
    import datasets

    cols = ["image", "question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category",
            "skill", "lecture", "solution"]
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("int8"),
        **{c: datasets.Value("string") for c in cols if c not in ("image", "question", "choices", "answer")}})
    return datasets.Dataset.from_dict({c: [r.get(c, "") for r in rows] for c in cols}, features=features)


def test_hub_schema(tmp_path):
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    row = dict(question="What color?", choices=["blue", "red"], answer=1, hint="Look.", lecture="Colors.",
               subject="natural science", grade="grade2", topic="physics", category="Identify colors")
    data = {"train": _hub_split([{**row, "image": red}, {**row, "image": None}]),
            "validation": _hub_split([{**row, "image": red}]),
            "test": _hub_split([{**row, "image": red, "subject": "social science"}])}
    manifest = preprocess("scienceqa", data, tmp_path / "proc", progress=False)
    assert manifest["counts"] == {"train": 1, "val": 1, "test": 1}
    assert manifest["filtered"]["text_only_skipped"]["train"] == 1
    records, image_root = load_split(tmp_path / "proc" / "scienceqa", "train")
    (r,) = records
    assert r["question_id"] == "train-0" and r["answer"] == "(b) red" and r["context"] == "Look. Colors."
    assert image_root == (tmp_path / "proc" / "scienceqa" / "images").absolute()
    with Image.open(image_root / r["image"]) as im:
        assert im.format == "PNG" and im.getpixel((0, 0)) == (255, 0, 0)
    assert render_prompt(r, "scienceqa") == "Context: {Look. Colors.} Question: {What color?} Options: {(a) blue\n(b) red\n} Answer:"
    keep = preprocess("scienceqa", data, tmp_path / "proc2", keep_text_only=True, progress=False)
    assert keep["counts"]["train"] == 2


def _custom_raw(root: Path, train_lines: list) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _png(root / "imgs" / "a.png")
    ok = {"image": "imgs/a.png", "question": "What color?", "choices": ["red", "blue"], "answer_index": 0}
    for split, lines in (("train", train_lines), ("val", [ok]), ("test", [ok])):
        (root / f"{split}.jsonl").write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                                                     for ln in lines))
    return root


def test_custom_jsonl(tmp_path):
    raw = _custom_raw(tmp_path / "raw", [
        {"image": "imgs/a.png", "question": "What color?", "choices": ["red", "blue"], "answer_index": 0},
        {"image": None, "question": "Opposite of hot?", "choices": ["cold", "big", "top"], "answer_index": 0,
         "context": "Antonyms.", "question_id": "q-hot", "meta": {"topic": "words"}}])
    preprocess("custom", raw, tmp_path / "proc", progress=False)
    (a, b), image_root = load_split(tmp_path / "proc" / "custom", "train")
    assert a["question_id"] == "train-1" and (image_root / a["image"]).is_file() and a["answer"] == "(a) red"
    assert b["question_id"] == "q-hot" and b["image"] is None and b["meta"] == {"topic": "words"}
    assert render_prompt(b, "custom") == ("Context: {Antonyms.} Question: {Opposite of hot?} "
                                          "Options: {(a) cold\n(b) big\n(c) top\n} Answer:")


# ---- bad input ------------------------------------------------------------------------------------

def _edit_problems(raw, fn):
    p = json.loads((raw / "problems.json").read_text())
    fn(p)
    (raw / "problems.json").write_text(json.dumps(p))


def _edit_splits(raw, fn):
    s = json.loads((raw / "pid_splits.json").read_text())
    fn(s)
    (raw / "pid_splits.json").write_text(json.dumps(s))


BAD_SCIENCEQA = {
    "missing problems": (lambda raw: (raw / "problems.json").unlink(), "problems.json", None, "not found"),
    "malformed problems": (lambda raw: (raw / "problems.json").write_text('{"1": {'), "problems.json", None,
                           "not valid JSON"),
    "missing split file": (lambda raw: (raw / "pid_splits.json").unlink(), "pid_splits.json", None, "missing"),
    "split without test": (lambda raw: _edit_splits(raw, lambda s: s.pop("test")), "pid_splits.json", None,
                           "missing split(s) test"),
    "pid not in problems": (lambda raw: _edit_splits(raw, lambda s: s["val"].append("99")), "pid_splits.json",
                            "'99'", "not in problems.json"),
    "answer out of range": (lambda raw: _edit_problems(raw, lambda p: p["4"].update(answer=2)), "problems.json",
                            "'4'", "answer index 2 out of range"),
    "empty choices": (lambda raw: _edit_problems(raw, lambda p: p["5"].update(choices=[])), "problems.json",
                      "'5'", "empty or missing choices"),
    "six choices": (lambda raw: _edit_problems(raw, lambda p: p["6"].update(choices=list("abcdef"))),
                    "problems.json", "'6'", "6 choices"),
    "missing image": (lambda raw: (raw / "images/test/7/image.png").unlink(), "problems.json", "'7'",
                      "image not found"),
    "unreadable image": (lambda raw: (raw / "images/train/2/image.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken"),
                         "problems.json", "'2'", "image unreadable"),
    "duplicate id across splits": (lambda raw: _edit_splits(raw, lambda s: s["test"].append("1")),
                                   "pid_splits.json", "'1'", "duplicate id"),
    "duplicate key in problems": (lambda raw: (raw / "problems.json").write_text(
        (raw / "problems.json").read_text().replace('{"1": ', '{"1": {}, "1": ', 1)), "problems.json", "'1'",
        "duplicate id"),
}


@pytest.mark.parametrize("case", list(BAD_SCIENCEQA))
def test_scienceqa_bad_input_one_clear_error_and_nothing_written(tmp_path, case):
    break_it, file, qid, problem = BAD_SCIENCEQA[case]
    raw = scienceqa_raw(tmp_path / "raw")
    break_it(raw)
    with pytest.raises(UserError) as e:
        preprocess("scienceqa", raw, tmp_path / "proc", progress=False)
    msg = str(e.value)
    assert file in msg and problem in msg, msg
    if qid:
        assert qid in msg, msg
    assert _leftovers(tmp_path / "proc") == []


def test_skip_invalid_reports_every_dropped_record(tmp_path):
    raw = scienceqa_raw(tmp_path / "raw")
    _edit_problems(raw, lambda p: (p["4"].update(answer=5), p["6"].update(choices=[])))
    (raw / "images/train/2/image.png").unlink()
    manifest = preprocess("scienceqa", raw, tmp_path / "proc", skip_invalid=True, progress=False)
    assert manifest["counts"] == {"train": 1, "val": 1, "test": 1}
    assert manifest["dropped"] == {"train": 1, "val": 1, "test": 1}
    dropped = [json.loads(ln) for ln in (tmp_path / "proc/scienceqa/dropped.jsonl").read_text().splitlines()]
    assert {(d["split"], d["question_id"]) for d in dropped} == {("train", "2"), ("val", "4"), ("test", "6")}
    assert all(d["problem"] and d["file"].endswith("problems.json") for d in dropped)


def test_iconqa_bad_data_json_names_the_file(tmp_path):
    raw = generate_sample(tmp_path / "raw", n_scienceqa=10, n_iconqa=15, iconqa_layout="per_question")["iconqa"]
    bad = sorted((raw / "iconqa_data/iconqa/val/choose_txt").iterdir())[0]
    (bad / "data.json").write_text("{")
    with pytest.raises(UserError) as e:
        preprocess("iconqa", raw, tmp_path / "proc", progress=False)
    assert str(bad / "data.json") in str(e.value) and f"'{bad.name}'" in str(e.value)
    assert _leftovers(tmp_path / "proc") == []


def test_custom_bad_line_names_file_and_line(tmp_path):
    raw = _custom_raw(tmp_path / "raw", [
        {"image": "imgs/a.png", "question": "q", "choices": ["x", "y"], "answer_index": 0},
        {"image": "imgs/missing.png", "question": "q", "choices": ["x", "y"], "answer_index": 1}])
    with pytest.raises(UserError) as e:
        preprocess("custom", raw, tmp_path / "proc", progress=False)
    assert "train.jsonl:2" in str(e.value) and "image not found" in str(e.value)
    assert _leftovers(tmp_path / "proc") == []
    raw = _custom_raw(tmp_path / "raw2", [{"image": None, "question": "q", "choices": ["x", "y"], "answer": 1}])
    with pytest.raises(UserError, match="missing field.*answer_index"):
        preprocess("custom", raw, tmp_path / "proc", progress=False)

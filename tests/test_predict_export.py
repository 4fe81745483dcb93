"""Using and sharing a finished run (tiny models, both LLM families): `predict` ranks a question exactly as
the run's evaluation did; an exported folder, a merged checkpoint loaded by plain transformers, and a hub
repo id (the download faked) all give the same answers; the model card; the 00_explore panel; every bad
input is one clear line with nothing written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import huggingface_hub
from instructblip_peft import cli
from instructblip_peft.data.prompts import candidate_texts, render_prompt, templates
from instructblip_peft.data.records import load_split
from instructblip_peft.errors import UserError
from instructblip_peft.evaluate import evaluate
from instructblip_peft.export import export, push
from instructblip_peft.finetuned import load_finetuned
from instructblip_peft.model_card import model_card, read_header
from instructblip_peft.predict import Predictor, predict
from instructblip_peft.train import train

from train_fixtures import FAST, SINGLE_THREAD_ENV

# Q-Former + LLM LoRA, rank 4, in each family: LoRA on both sides plus the always-trained tensors.
RUNS = {"t5": "31", "llama": "63"}
# A short run with a large step, so that LoRA's B matrices are far from their zero start.
SETTINGS = dict(FAST, epochs=1, max_steps=3, learning_rate=1e-2)


@pytest.fixture(scope="module")
def outputs(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    for exp in RUNS.values():
        train("scienceqa", exp, out / "scienceqa" / exp, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    return out


def run_of(outputs, family):
    return outputs / "scienceqa" / RUNS[family]


def recorded(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "predictions_test.jsonl").read_text().splitlines()]


def eval_records(data):
    records, image_root = load_split(data, "test")
    return records[: SETTINGS["max_eval_samples"]], image_root


# ---------------------------------------------------------------- predict == the run's own evaluation

@pytest.mark.parametrize("family", list(RUNS))
def test_predict_agrees_exactly_with_the_runs_test_predictions(family, outputs, data, capsys):
    run = run_of(outputs, family)
    records, image_root = eval_records(data)
    want = recorded(run)
    rec, row = records[3], want[3]
    result = predict(run, rec["question"], rec["choices"], image_root / rec["image"], rec["context"], device="cpu")
    assert result["predicted"] == row["predicted"] and result["scores"] == row["scores"]
    assert result["predicted_answer"] == candidate_texts(rec)[row["predicted"]]
    assert sum(result["probabilities"]) == pytest.approx(1.0)
    assert max(result["probabilities"]) == result["probabilities"][row["predicted"]]

    # The CLI prints every choice with its score, and the winner.
    capsys.readouterr()
    assert cli.main(["predict", str(run), "--image", str(image_root / rec["image"]), "--question", rec["question"],
                     *[a for c in rec["choices"] for a in ("--choice", c)], "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for i, (choice, score) in enumerate(zip(rec["choices"], row["scores"])):
        assert f"({'ab'[i]}) {choice}" in out and f"{score:.4f}" in out
    assert out.strip().splitlines()[-1] == f"answer: {candidate_texts(rec)[row['predicted']]}"


def test_batch_predict_writes_the_runs_predictions_for_its_test_questions(outputs, data, tmp_path, capsys):
    run = run_of(outputs, "t5")
    records, image_root = eval_records(data)
    questions = tmp_path / "questions.jsonl"
    (tmp_path / "images").symlink_to(image_root)
    # The custom data format; answers are optional (one left out), images relative to the file.
    lines = [{k: r[k] for k in ("question", "choices", "context", "question_id")} |
             {"image": f"images/{r['image']}"} | ({"answer_index": r["answer_index"]} if i else {})
             for i, r in enumerate(records)]
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["predict", str(run), "--input", str(questions), "--device", "cpu"]) == 0
    assert f"{len(records)} predictions written to" in capsys.readouterr().out
    got = [json.loads(line) for line in (tmp_path / "questions.predictions.jsonl").read_text().splitlines()]
    want = recorded(run)
    assert [g["question_id"] for g in got] == [w["question_id"] for w in want]
    assert [g["predicted"] for g in got] == [w["predicted"] for w in want]
    assert [g["scores"] for g in got] == [w["scores"] for w in want]
    assert "correct" not in got[0] and [g["correct"] for g in got[1:]] == [w["correct"] for w in want[1:]]


def test_without_choices_the_model_generates_a_free_answer(outputs, data):
    records, image_root = eval_records(data)
    result = predict(run_of(outputs, "llama"), "Which color is the picture?", image=image_root / records[0]["image"],
                     device="cpu")
    assert isinstance(result["generated"], str) and "scores" not in result


# ---------------------------------------------------------------- export: adapter folder, merged checkpoint

@pytest.fixture(scope="module")
def exported(outputs, tmp_path_factory):
    """Per family: the adapter folder and the merged checkpoint, both written by the CLI."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for family in RUNS:
        run = run_of(outputs, family)
        adapter, merged = root / f"{family}-adapter", root / f"{family}-merged"
        assert cli.main(["export", str(run), str(adapter)]) == 0
        assert cli.main(["export", str(run), str(merged), "--merged"]) == 0
        out[family] = (adapter, merged)
    return out


@pytest.mark.parametrize("family", list(RUNS))
def test_exported_adapter_folder_is_self_contained(family, outputs, exported, data):
    adapter, _ = exported[family]
    names = {p.name for p in adapter.iterdir()}
    assert names == {"adapter", "trained_tensors.safetensors", "run.json", "metrics.json", "README.md"}
    info = json.loads((adapter / "run.json").read_text())
    assert info["preset"] == f"tiny-{family}" and "model_seed" in info and "processed_dir" not in info
    # Nothing else needed: a copy elsewhere answers like the run (the base is rebuilt from preset + seed).
    moved = adapter.parent / f"{family}-moved"
    shutil.copytree(adapter, moved)
    records, image_root = eval_records(data)
    got = Predictor(moved, "cpu").ask_many(records, image_root)
    want = recorded(run_of(outputs, family))
    assert [g["scores"] for g in got] == [w["scores"] for w in want]


@pytest.mark.parametrize("family", list(RUNS))
def test_merged_checkpoint_ranks_like_the_adapter(family, outputs, exported, data):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    _, merged = exported[family]
    model = InstructBlipForConditionalGeneration.from_pretrained(merged).eval()
    processor = InstructBlipProcessor.from_pretrained(merged)
    finetuned, fprocessor, info = load_finetuned(run_of(outputs, family))
    records, image_root = eval_records(data)
    settings = info["settings"]
    a = evaluate(model, processor, records, image_root, "scienceqa", settings, family, progress=False)
    b = evaluate(finetuned, fprocessor, records, image_root, "scienceqa", settings, family, progress=False)
    assert [p["predicted"] for p in a.predictions] == [p["predicted"] for p in b.predictions]
    np.testing.assert_allclose([p["scores"] for p in a.predictions], [p["scores"] for p in b.predictions], rtol=1e-5)
    assert [p["predicted"] for p in b.predictions] == [p["predicted"] for p in recorded(run_of(outputs, family))]
    # LoRA changed the model (so the agreement above is not the base model agreeing with itself).
    zero = finetuned.get_base_model() if hasattr(finetuned, "get_base_model") else finetuned
    with finetuned.disable_adapter():
        c = evaluate(zero, fprocessor, records, image_root, "scienceqa", settings, family, progress=False)
    assert not np.allclose([p["scores"] for p in c.predictions], [p["scores"] for p in b.predictions], rtol=1e-3)
    # This package reads the merged folder too.
    got = Predictor(merged, "cpu").ask_many(records, image_root)
    assert [g["predicted"] for g in got] == [p["predicted"] for p in b.predictions]


PLAIN = r"""
import json, sys
import torch
from PIL import Image
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor
folder, image, prompt, candidates = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model = InstructBlipForConditionalGeneration.from_pretrained(folder).eval()
processor = InstructBlipProcessor.from_pretrained(folder)
inputs = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt")
scores = []
with torch.no_grad():
    for c in candidates:
        labels = processor.tokenizer(c, return_tensors="pt").input_ids
        scores.append(model(**inputs, labels=labels).loss.item() * labels.shape[1])
print(json.dumps({"scores": scores, "package_loaded": any(m.startswith("instructblip_peft") for m in sys.modules)}))
"""


def test_merged_checkpoint_needs_only_transformers(outputs, exported, data):
    """A transformers user, without this package, scores the candidates the way the card says (T5: summed
    cross-entropy of "(a) choice</s>") and gets the run's recorded scores."""
    _, merged = exported["t5"]
    records, image_root = eval_records(data)
    rec, row = records[0], recorded(run_of(outputs, "t5"))[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | SINGLE_THREAD_ENV
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(merged), str(image_root / rec["image"]),
                           render_prompt(rec, "scienceqa"), json.dumps(candidate_texts(rec))],
                          capture_output=True, text=True, timeout=120, env=env, cwd=merged.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["package_loaded"] is False
    np.testing.assert_allclose(got["scores"], row["scores"], rtol=1e-5)


# ---------------------------------------------------------------- the model card

def test_model_card_has_the_hub_header_and_the_runs_numbers(outputs, exported):
    adapter, merged = exported["t5"]
    card = (adapter / "README.md").read_text()
    head = read_header(card)
    assert head["library_name"] == "peft" and head["datasets"] == ["derek-thomas/ScienceQA"]
    assert head["metrics"] == ["accuracy"] and {"instructblip", "lora", "scienceqa"} <= set(head["tags"])
    assert "base_model" not in head  # a tiny preset has no hub base model; the card says how it is rebuilt
    metrics = json.loads((run_of(outputs, "t5") / "metrics.json").read_text())
    for text in ("## Experiment", "## Method", "Where the adapters sit",
                 "qformer.encoder.layer.*.attention.attention.query",
                 "## Trainable parameters", f"{metrics['trainable_params']:,} of {metrics['total_params']:,}",
                 "## Results", f"| test | {100 * metrics['test_accuracy']:.2f} |", "| NAT |", "## Recipe",
                 "`learning_rate` | `0.01`", "rebuilt from seed 42", f'Predictor("{adapter.name}")', "## Citation",
                 "2410.09489", "Towards Efficient Visual-Language Alignment of the Q-Former"):
        assert text in card, text
    merged_card = (merged / "README.md").read_text()
    assert read_header(merged_card)["library_name"] == "transformers"
    assert f'InstructBlipForConditionalGeneration.from_pretrained("{merged.name}")' in merged_card


def test_model_card_of_a_real_model_names_its_base_model(outputs):
    info = json.loads((run_of(outputs, "llama") / "run.json").read_text())
    metrics = json.loads((run_of(outputs, "llama") / "metrics.json").read_text())
    info.update(preset="vicuna7b", model_source="Salesforce/instructblip-vicuna-7b")
    card = model_card(info, metrics, merged=False, where="someone/vicuna-lora")
    head = read_header(card)
    assert head["base_model"] == "Salesforce/instructblip-vicuna-7b" and "llama" in head["tags"]
    assert "# InstructBLIP Vicuna-7B: Q-Former+LLM LoRA all, rank 4" in card
    assert "layers.*.self_attn.q_proj" in card and "layers.*.mlp.down_proj" in card
    assert 'Predictor("someone/vicuna-lora")' in card


# ---------------------------------------------------------------- the hub (no network here: faked at its API)

def test_load_finetuned_and_predict_accept_a_hub_repo_id(outputs, exported, data, monkeypatch, capsys):
    adapter, _ = exported["llama"]
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(adapter)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    _, _, info = load_finetuned("someone/tiny-llama-lora")
    assert info["experiment"] == RUNS["llama"] and calls == ["someone/tiny-llama-lora"]
    records, image_root = eval_records(data)
    rec, row = records[2], recorded(run_of(outputs, "llama"))[2]
    result = predict("hub:someone/tiny-llama-lora", rec["question"], rec["choices"], image_root / rec["image"],
                     device="cpu")
    assert result["scores"] == row["scores"] and calls[-1] == "someone/tiny-llama-lora"


def test_push_exports_then_uploads_everything_up_to_the_upload_call(outputs, monkeypatch, capsys):
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
            uploads.append(("create", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
            folder = Path(folder_path)
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            uploads.append(("upload", repo_id, files, (folder / "README.md").read_text()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert cli.main(["push", str(run_of(outputs, "t5")), "someone/tiny-t5-lora", "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    (_, repo, private, exist_ok), (_, repo2, files, card) = uploads
    assert (repo, private, exist_ok, repo2) == ("someone/tiny-t5-lora", True, True, "someone/tiny-t5-lora")
    assert {"README.md", "run.json", "metrics.json", "trained_tensors.safetensors",
            "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(files)
    assert 'Predictor("someone/tiny-t5-lora")' in card

    class Offline(FakeApi):
        def create_repo(self, *a, **k):
            raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(UserError, match="cannot upload to hub repo 'someone/x': OSError: Name or service not known"):
        push(run_of(outputs, "t5"), "someone/x")


# ---------------------------------------------------------------- the 00_explore panel

def test_prediction_panel_ranks_a_dataset_question_and_an_uploaded_image(outputs, data, tmp_path):
    import matplotlib.pyplot as plt

    from instructblip_peft import widgets

    assert "No finished runs" in widgets.prediction_explorer(tmp_path / "none", data.parent).value
    panel = widgets.PredictionPanel(outputs, data.parent)
    assert sorted(Path(v).name for _, v in panel.run.options) == sorted(RUNS.values())
    panel.run.value = str(run_of(outputs, "t5"))
    rec = panel.pick_question(3)
    assert panel.question.value == rec["question"] and panel.choices.value.splitlines() == rec["choices"]
    result, fig = panel.predict()
    assert result["scores"] == recorded(run_of(outputs, "t5"))[3]["scores"]
    assert len(fig.axes[1].patches) == len(rec["choices"])  # one bar per choice
    _, image_root = eval_records(data)
    panel._on_upload({"new": ({"name": "mine.png", "content": memoryview((image_root / "red.png").read_bytes())},)})
    panel.choices.value = "red\nblue\ngreen"
    result, fig = panel.predict()
    assert len(result["scores"]) == 3 and len(fig.axes[1].patches) == 3
    panel._on_upload({"new": ({"name": "broken.png", "content": memoryview(b"not an image")},)})
    with pytest.raises(UserError, match="image unreadable"):
        panel.predict()
    plt.close("all")


# ---------------------------------------------------------------- bad input: one line, nothing written

@pytest.fixture
def unfinished(outputs, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(run_of(outputs, "t5"), run)
    (run / "metrics.json").unlink()  # as if killed before the end
    return run


@pytest.fixture
def no_options_template(tmp_path, monkeypatch):
    """params/ with a ScienceQA prompt that shows no choices."""
    from instructblip_peft import config

    params = tmp_path / "params"
    shutil.copytree(config.params_dir(), params)
    data_yaml = yaml.safe_load((params / "data.yaml").read_text())
    data_yaml["templates"]["scienceqa"]["prompt"] = "Question: {question} Answer:"
    (params / "data.yaml").write_text(yaml.safe_dump(data_yaml))
    monkeypatch.setenv("INSTRUCTBLIP_PEFT_PARAMS", str(params))
    templates.cache_clear()
    yield
    monkeypatch.delenv("INSTRUCTBLIP_PEFT_PARAMS")
    templates.cache_clear()


BAD = {
    "unfinished run": (["predict", "{unfinished}", "--question", "Which?", "--choice", "a", "--choice", "b"],
                       ["the run has not finished", "metrics.json"]),
    "export of an unfinished run": (["export", "{unfinished}", "{tmp}/dest"], ["the run has not finished"]),
    "missing image": (["predict", "{run}", "--image", "{tmp}/nope.png", "--question", "Which?", "--choice", "a",
                       "--choice", "b"], ["image not found", "nope.png"]),
    "unreadable image": (["predict", "{run}", "--image", "{tmp}/broken.png", "--question", "Which?", "--choice", "a",
                          "--choice", "b"], ["image unreadable", "broken.png"]),
    "one choice": (["predict", "{run}", "--question", "Which?", "--choice", "a"], ["only 1 choice"]),
    "choices for a template without options": (["predict", "{run}", "--question", "Which?", "--choice", "a",
                                                "--choice", "b"], ["templates.scienceqa.prompt", "has no {options}"]),
    "no question": (["predict", "{run}", "--image", "{tmp}/broken.png"], ["give --question"]),
    "bad line in a questions file": (["predict", "{run}", "--input", "{tmp}/questions.jsonl"],
                                     ["questions.jsonl:2", "answer index 5 out of range"]),
    "questions file and a question": (["predict", "{run}", "--input", "{tmp}/questions.jsonl", "--question", "Q"],
                                      ["either --input FILE or a single question"]),
    "destination exists": (["export", "{run}", "{tmp}/existing"], ["existing: already exists"]),
    "no such run": (["export", "{tmp}/a/b/c", "{tmp}/dest"], ["no such run directory or exported folder"]),
    "bad repo id": (["push", "{run}", "not a repo"], ["'not a repo': not a hub repo id"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, outputs, unfinished, tmp_path, capsys, request):
    argv, words = BAD[case]
    if case == "choices for a template without options":
        request.getfixturevalue("no_options_template")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "mine.txt").write_text("keep me")
    (tmp_path / "questions.jsonl").write_text(
        json.dumps({"question": "Which?", "choices": ["a", "b"], "image": None}) + "\n"
        + json.dumps({"question": "Which?", "choices": ["a", "b"], "answer_index": 5, "image": None}) + "\n")
    before = sorted(tmp_path.rglob("*"))
    run_before = {p: p.stat().st_mtime_ns for p in run_of(outputs, "t5").rglob("*")}
    argv = [a.format(run=run_of(outputs, "t5"), unfinished=unfinished, tmp=tmp_path) for a in argv]
    capsys.readouterr()
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and out == "", err
    assert all(w in err for w in words), err
    assert sorted(tmp_path.rglob("*")) == before
    assert (tmp_path / "existing" / "mine.txt").read_text() == "keep me"
    assert {p: p.stat().st_mtime_ns for p in run_of(outputs, "t5").rglob("*")} == run_before


def test_a_failure_while_exporting_leaves_no_folder(outputs, tmp_path, monkeypatch):
    import instructblip_peft.export as export_module

    def broken(run_path, folder):
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "_write_merged", broken)
    with pytest.raises(UserError, match="No space left on device"):
        export(run_of(outputs, "t5"), tmp_path / "dest", merged=True)
    assert list(tmp_path.iterdir()) == []

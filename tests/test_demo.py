"""After `instructblip-peft demo`, the notebooks show its runs with their defaults; real runs, once there,
come first and are analysed without the demo's."""
import importlib.util
import json
import os
from pathlib import Path

from instructblip_peft import cli, runner
from instructblip_peft.artifacts import browsable_runs, shown_outputs, shown_processed
from instructblip_peft.data.sample import ensure_sample
from instructblip_peft.display import score_lines

from test_analysis import fake_run

REPO = Path(__file__).resolve().parents[1]


def work_dir(tmp_path, monkeypatch) -> Path:
    """A fresh work directory (its outputs/ and data/ are the defaults) sharing the suite's generated sample."""
    shared = ensure_sample()  # under the suite's work directory (conftest): generated once per session
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "sample").symlink_to(shared)
    monkeypatch.setenv("INSTRUCTBLIP_PEFT_WORKDIR", str(tmp_path))  # the kernels inherit it
    return tmp_path


def cell_text(notebook: Path) -> str:
    out = []
    for cell in json.loads(notebook.read_text())["cells"]:
        for o in cell.get("outputs", []):
            out.append("".join(o.get("text", "")) + "".join((o.get("data") or {}).get("text/plain", "")))
    return "\n".join(out)


def test_the_notebooks_show_the_demo_until_there_are_real_runs(tmp_path, monkeypatch):
    work = work_dir(tmp_path, monkeypatch)
    outputs, demo = work / "outputs", work / "outputs" / "demo"
    assert shown_outputs() == (outputs, "")                         # nothing anywhere: no note
    fake_run(demo, "scienceqa", "27", 0.5)
    (demo / "processed" / "scienceqa").mkdir(parents=True)
    (demo / "processed" / "scienceqa" / "manifest.json").write_text("{}")
    root, note = shown_outputs()
    assert root == demo and "demo's runs" in note and len(note.splitlines()) == 1
    assert shown_processed() == demo / "processed"

    fake_run(outputs, "iconqa", "15", 0.6)                         # a real run: it is what 04 analyses
    (work / "data" / "processed" / "iconqa").mkdir(parents=True)
    (work / "data" / "processed" / "iconqa" / "manifest.json").write_text("{}")
    assert shown_outputs() == (outputs, "")
    assert [r.path for r in browsable_runs()] == [outputs / "iconqa" / "15", demo / "scienceqa" / "27"]
    assert shown_processed() == work / "data" / "processed"
    assert shown_outputs(str(demo))[0] == demo                      # an outputs_dir given is shown as is


def test_the_demo_ends_naming_the_notebook_to_open_next(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INSTRUCTBLIP_PEFT_WORKDIR", str(tmp_path))
    demo = tmp_path / "outputs" / "demo"
    fake_run(demo, "scienceqa", "27", 0.5)
    (demo / "processed").mkdir()
    monkeypatch.setattr(runner, "run_demo", lambda outputs, log: runner.DemoResult(demo, demo / "analysis", []))
    assert cli.main(["demo"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "open notebooks/04_analysis.ipynb" in last and "outputs_dir" not in last   # its defaults show them


def test_after_the_demo_00_and_04_find_its_runs_with_their_defaults(tmp_path, monkeypatch):
    work = work_dir(tmp_path, monkeypatch)
    threads = os.environ.get("OMP_NUM_THREADS")
    result = runner.run_demo(datasets=["scienceqa"], experiments=["27"],
                             overrides={"max_steps": 2, "max_eval_samples": 8}, log=lambda line: None)
    assert not result.failed and result.outputs_dir == work / "outputs" / "demo"
    assert os.environ.get("OMP_NUM_THREADS") == threads               # the kernels' thread setting is undone

    # papermill, default parameters; side by side, as the demo runs its notebooks
    runner.in_parallel(lambda key: runner.execute(key, work / f"{key}.ipynb", {}, progress=False),
                       ["explore", "analysis"], 2)
    explore, analysis = cell_text(work / "explore.ipynb"), cell_text(work / "analysis.ipynb")
    for text in (explore, analysis):
        assert "These are the demo's runs (tiny random models on the bundled sample)" in text
    assert "Dropdown(description='run'" in explore and "No finished runs" not in explore  # the run browser
    assert f"1 runs under {result.outputs_dir}, 1 finished" in analysis
    assert (result.outputs_dir / "analysis" / "results.md").is_file()
    assert not (work / "outputs" / "analysis").exists()              # never written as if they were real runs

    # The demo's timing script reads the same directory (benchmarks/demo_time.py --report).
    spec = importlib.util.spec_from_file_location("demo_time", REPO / "benchmarks" / "demo_time.py")
    demo_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_time)
    phases = demo_time.report(result.outputs_dir)
    assert set(phases["preprocess"]) == {"scienceqa"} and list(phases["runs"]) == ["scienceqa 27"]
    run = phases["runs"]["scienceqa 27"]
    assert run["train_steps"] > 0 and run["eval"] > 0 and run["startup_02"] > 0 and phases["analysis"]["total"] > 0


def test_the_predictions_browser_labels_each_score_with_its_choice():
    record = {"choices": ["red", "blue", "green"], "answer_index": 2}
    text = score_lines(record, {"scores": [4.25, 1.5, 2.0], "predicted": 1})
    assert text.splitlines() == ["candidate scores (summed cross-entropy, lower wins):",
                                 "  (a) red       4.250",
                                 "  (b) blue      1.500  <- predicted",
                                 "  (c) green     2.000  <- answer"]

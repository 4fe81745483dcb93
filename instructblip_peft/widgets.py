"""The ipywidgets browsers of notebook 00: a processed dataset, an experiment's placement, a finished run's
predictions. What they draw comes from display.py."""
from __future__ import annotations

from pathlib import Path

from .artifacts import RunDir, is_demo_dir, run_dirs
from .config import processed_root
from .data.prompts import render_prompt
from .data.records import MANIFEST, SPLITS, load_split
from .display import describe_placement, read_predictions, score_lines, show_records
from .errors import UserError


# ---------------------------------------------------------------- ipywidgets browsers (notebook 00)

def dataset_browser(processed_dir: Path, datasets=("scienceqa", "iconqa")):
    """Browse processed records: image, the prompt as the model sees it, choices and answer."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display


    available = [d for d in datasets if (Path(processed_dir) / d / MANIFEST).is_file()]
    if not available:
        return w.HTML(f"No processed data in {processed_dir}: run notebook 01 or `instructblip-peft preprocess`.")
    ds = w.Dropdown(options=available, description="dataset")
    split = w.Dropdown(options=list(SPLITS), value="train", description="split")
    index = w.IntSlider(min=0, max=0, description="record")
    out = w.Output()
    cache: dict = {}

    def current():
        key = (ds.value, split.value)
        if key not in cache:
            cache[key] = load_split(Path(processed_dir) / ds.value, split.value)
        return cache[key]

    def show(*_):
        records, image_root = current()
        index.max = max(len(records) - 1, 0)
        rec = records[min(index.value, index.max)]
        out.clear_output(wait=True)
        with out:
            print(f"{rec['question_id']}  answer: {rec['answer']}  meta: {rec.get('meta')}")
            print("prompt:", render_prompt(rec, ds.value))
            fig = show_records([rec], image_root, ds.value, columns=1)
            display(fig)
            plt.close(fig)

    for c in (ds, split, index):
        c.observe(show, names="value")
    show()
    return w.VBox([w.HBox([ds, split]), index, out])


def experiment_browser(preset: str = "tiny"):
    """Pick an experiment and a preset: where LoRA goes and the parameter counts."""
    import ipywidgets as w

    from .experiments import registry
    from .model import preset_names

    exp = w.Dropdown(options=[(e.describe(), k) for k, e in registry().items()], value="15",
                     description="experiment", layout=w.Layout(width="480px"))
    pre = w.Dropdown(options=["tiny", "auto", *preset_names()], value=preset, description="preset")
    out = w.Output()

    def show(*_):
        out.clear_output(wait=True)
        with out:
            try:
                print(describe_placement(exp.value, pre.value))
            except Exception as e:  # a preset of the other LLM family: say so in place
                print(f"error: {e}")

    exp.observe(show, names="value")
    pre.observe(show, names="value")
    show()
    return w.VBox([w.HBox([exp, pre]), out])


def run_browser(runs, processed_dir: Path | None = None):
    """Browse finished runs' test predictions, with the images and every candidate's score.

    `runs`: an outputs directory, or a list of run directories (artifacts.browsable_runs). A run's records
    come from the processed data it used (run.json), else from `processed_dir`/<dataset>."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    where = runs
    runs = run_dirs(runs) if isinstance(runs, (str, Path)) else [RunDir(r) for r in runs]
    runs = [r for r in runs if r.predictions("test").is_file()]
    if not runs:
        return w.HTML(f"No finished runs under {where}: run notebook 02 or `instructblip-peft run`."
                      if isinstance(where, (str, Path)) else
                      "No finished runs yet: run notebook 02, `instructblip-peft run` or `instructblip-peft demo`.")

    def label(r: RunDir) -> str:
        return f"{r.path.parent.name} {r.path.name}" + (" (demo)" if is_demo_dir(r.path.parent.parent) else "")

    run = w.Dropdown(options=[(label(r), str(r.path)) for r in runs], description="run",
                     layout=w.Layout(width="420px"))
    only_wrong = w.Checkbox(value=False, description="only wrong")
    index = w.IntSlider(min=0, max=0, description="prediction")
    out = w.Output()

    def show(*_):
        chosen = RunDir(run.value)
        dataset = chosen.path.parent.name
        preds = read_predictions(chosen.path)
        out.clear_output(wait=True)
        try:
            records, image_root = load_split(chosen.dataset_dir() or processed_root(processed_dir) / dataset, "test")
        except UserError as e:  # the processed data it used is gone: say so in place
            with out:
                print(f"error: {e}")
            return
        records = [r for r in records if r["question_id"] in preds and not (only_wrong.value and
                                                                              preds[r["question_id"]]["correct"])]
        with out:
            if not records:
                print("no predictions to show")
                return
            index.max = len(records) - 1
            rec = records[min(index.value, index.max)]
            accuracy = 100 * sum(p["correct"] for p in preds.values()) / len(preds)
            print(f"test accuracy {accuracy:.1f}% ({len(preds)} questions); showing {len(records)}"
                  f"{' answered wrongly' if only_wrong.value else ''}")
            print(score_lines(rec, preds[rec["question_id"]]))
            fig = show_records([rec], image_root, dataset, preds, columns=1)
            display(fig)
            plt.close(fig)

    for c in (run, only_wrong, index):
        c.observe(show, names="value")
    show()
    return w.VBox([w.HBox([run, only_wrong]), index, out])

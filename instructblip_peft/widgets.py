"""The ipywidgets browsers of notebook 00: a processed dataset, an experiment's placement, a finished run's
predictions. What they draw comes from display.py."""
from __future__ import annotations

from pathlib import Path

from .artifacts import run_dirs
from .data.prompts import render_prompt
from .data.records import MANIFEST, SPLITS, load_split
from .display import describe_placement, read_predictions, show_records


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


def run_browser(outputs_dir: Path, processed_dir: Path):
    """Browse a finished run's test predictions, with the images."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display


    runs = [r.path for r in run_dirs(outputs_dir) if r.predictions("test").is_file()]
    if not runs:
        return w.HTML(f"No finished runs under {outputs_dir}: run notebook 02 or `instructblip-peft run`.")
    run = w.Dropdown(options=[(f"{p.parent.name} {p.name}", str(p)) for p in runs], description="run")
    only_wrong = w.Checkbox(value=False, description="only wrong")
    index = w.IntSlider(min=0, max=0, description="prediction")
    out = w.Output()

    def show(*_):
        run_dir = Path(run.value)
        dataset = run_dir.parent.name
        preds = read_predictions(run_dir)
        records, image_root = load_split(Path(processed_dir) / dataset, "test")
        records = [r for r in records if r["question_id"] in preds and not (only_wrong.value and
                                                                              preds[r["question_id"]]["correct"])]
        out.clear_output(wait=True)
        with out:
            if not records:
                print("no predictions to show")
                return
            index.max = len(records) - 1
            rec = records[min(index.value, index.max)]
            print(f"{len(records)} predictions; scores: {preds[rec['question_id']].get('scores')}")
            fig = show_records([rec], image_root, dataset, preds, columns=1)
            display(fig)
            plt.close(fig)

    for c in (run, only_wrong, index):
        c.observe(show, names="value")
    show()
    return w.VBox([w.HBox([run, only_wrong]), index, out])

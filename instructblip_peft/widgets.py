"""The ipywidgets browsers of notebook 00: a processed dataset, an experiment's placement, a finished run's
predictions, and asking a finished run a question of your own. What they draw comes from display.py."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .artifacts import RunDir, is_demo_dir, run_dirs
from .config import processed_root
from .data.prompts import LETTERS, render_prompt
from .data.records import MANIFEST, SPLITS, load_split
from .display import describe_placement, prediction_chart, read_predictions, score_lines, show_records
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


# ---------------------------------------------------------------- ask a finished run (predict.py)

class PredictionPanel:
    """Choose a finished run, upload an image (or pick one of its dataset's test questions), type a question
    and choices, and see the choices ranked as evaluation ranks them, as a bar chart. `widget` is what a
    notebook shows; `predict()` is what the button does (returns the result and the figure)."""

    def __init__(self, outputs_dir: Path, processed_dir: Path):
        import ipywidgets as w

        self.processed_dir = Path(processed_dir)
        self.runs = [r for r in run_dirs(outputs_dir) if r.is_finished()]
        self._predictors: dict = {}
        self._uploads = tempfile.TemporaryDirectory(prefix="instructblip-peft-upload-")
        self.image_path: Path | None = None
        wide = w.Layout(width="560px")
        self.run = w.Dropdown(options=[(f"{r.path.parent.name} {r.path.name}", str(r.path)) for r in self.runs],
                              description="run", layout=wide)
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload image")
        self.pick = w.IntText(value=0, description="test question", layout=w.Layout(width="200px"))
        self.use_pick = w.Button(description="use this dataset question")
        self.question = w.Text(description="question", layout=wide)
        self.choices = w.Textarea(description="choices", placeholder="one per line (none: a free answer)",
                                  layout=w.Layout(width="560px", height="90px"))
        self.context = w.Text(description="context", layout=wide)
        self.button = w.Button(description="Predict", button_style="primary")
        self.status = w.HTML()
        self.out = w.Output()
        self.upload.observe(self._on_upload, names="value")
        self.use_pick.on_click(self._on_pick)
        self.button.on_click(lambda _: self._show())
        self.widget = w.VBox([self.run, w.HBox([self.upload, self.pick, self.use_pick]), self.question,
                              self.choices, self.context, w.HBox([self.button, self.status]), self.out])

    def _split(self, run_dir: Path):
        info = RunDir(run_dir).run_info()
        recorded = Path(info.get("processed_dir") or "")
        dataset_dir = recorded if (recorded / MANIFEST).is_file() else self.processed_dir / info["dataset"]
        return load_split(dataset_dir, "test")

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0]
        path = Path(self._uploads.name) / Path(item["name"]).name
        path.write_bytes(bytes(item["content"]))
        self.image_path = path
        self.status.value = f"image: {item['name']}"

    def _on_pick(self, _) -> None:
        try:
            self.pick_question(self.pick.value)
        except UserError as e:  # no processed data for the run's dataset
            self.status.value = f"error: {e}"

    def pick_question(self, index: int) -> dict:
        """Fill the form with the run's dataset's test question `index` (its image too)."""
        records, image_root = self._split(Path(self.run.value))
        rec = records[max(0, min(index, len(records) - 1))]
        self.question.value, self.context.value = rec["question"], rec.get("context") or ""
        self.choices.value = "\n".join(rec["choices"])
        self.image_path = Path(image_root) / rec["image"] if rec.get("image") else None
        recorded = RunDir(self.run.value).predictions_rows("test").get(rec["question_id"])
        note = ""
        if recorded and recorded["predicted"] >= 0:
            note = f"; the run predicted ({LETTERS[recorded['predicted']]})"
        self.status.value = f"{rec['question_id']} (answer {rec['answer']}){note}"
        return rec

    def predict(self):
        """(result, figure) for what the form says."""
        from .predict import Predictor, check_questions

        run_dir = self.run.value
        choices = [c.strip() for c in self.choices.value.splitlines() if c.strip()]
        row = {"question": self.question.value, "choices": choices, "context": self.context.value,
               "image": None if self.image_path is None else str(self.image_path)}
        check_questions([row], RunDir(run_dir).run_info()["dataset"], where=None)
        if run_dir not in self._predictors:
            self._predictors[run_dir] = Predictor(run_dir)
        result = self._predictors[run_dir].ask_many([row], Path.cwd())[0]
        return result, prediction_chart(result, self.image_path)

    def _show(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.out.clear_output(wait=True)
        with self.out:
            try:
                _, fig = self.predict()
            except UserError as e:
                print(f"error: {e}")
                return
            display(fig)
            plt.close(fig)


def prediction_explorer(outputs_dir: Path, processed_dir: Path):
    """The PredictionPanel, or a note saying how to get a finished run when there is none."""
    import ipywidgets as w

    if not any(r.is_finished() for r in run_dirs(outputs_dir)):
        return w.HTML(f"No finished runs under {outputs_dir}: run notebook 02 or `instructblip-peft run` (or "
                      "`instructblip-peft demo`), then ask it here.")
    return PredictionPanel(outputs_dir, processed_dir).widget

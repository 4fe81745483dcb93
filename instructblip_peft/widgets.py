"""What the notebooks show: records with their images, where LoRA goes, predictions, and the
ipywidgets browsers of notebook 00. Notebooks stay thin; the logic is here."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pandas as pd

from .data.prompts import LETTERS, render_prompt


# ---------------------------------------------------------------- where LoRA goes

def lora_placement(experiment, preset: str | None = "tiny") -> tuple[pd.DataFrame, dict]:
    """Modules that get LoRA, grouped over layer numbers, and the parameter counts, for `experiment` on
    `preset` (built on the meta device: no download, no memory)."""
    from .accounting import count_parameters, full_qformer_size
    from .experiments import get_experiment
    from .lora import apply_experiment, lora_module_names, non_lora_trainable
    from .model import meta_model, preset_for

    exp = get_experiment(experiment) if isinstance(experiment, str) else experiment
    p = preset_for(exp, preset)
    model = apply_experiment(meta_model(p), exp)
    rows: dict[str, int] = {}
    for name in lora_module_names(model):
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        rows[pattern] = rows.get(pattern, 0) + 1
    # Non-LoRA tensors that train, grouped by their top-level part (e.g. the whole Q-Former).
    extra: dict[str, int] = {}
    for name, t in non_lora_trainable(model).items():
        parts = name.split(".")
        part = ".".join(parts[:2]) if parts[0] == "vision_model" else parts[0]
        extra[part] = extra.get(part, 0) + t.numel()
    table = pd.DataFrame([{"LoRA on": k, "modules": v} for k, v in rows.items()], columns=["LoRA on", "modules"])
    counts = count_parameters(model)
    counts["full_qformer_params"] = full_qformer_size(model)
    counts["trainable_share_of_full_qformer"] = counts["trainable_params"] / counts["full_qformer_params"]
    counts["non_lora_trainable"] = extra
    counts["preset"] = p["name"]
    return table, counts


def describe_placement(experiment, preset: str | None = "tiny") -> str:
    """A deterministic text report of lora_placement (stable enough to be checked by nbval)."""
    table, c = lora_placement(experiment, preset)
    lines = [f"preset {c['preset']}"]
    lines += [f"  LoRA on {r['LoRA on']}  (x{r['modules']})" for _, r in table.iterrows()] or ["  no LoRA"]
    lines += [f"  also trains {part}: {n:,} parameters" for part, n in sorted(c["non_lora_trainable"].items())]
    lines += [f"trainable {c['trainable_params']:,} of {c['total_params']:,} parameters "
              f"({100 * c['trainable_params'] / c['total_params']:.3f} %); LoRA {c['lora_params']:,}; "
              f"{100 * c['trainable_share_of_full_qformer']:.2f} % of full Q-Former fine-tuning "
              f"({c['full_qformer_params']:,})"]
    return "\n".join(lines)


# ---------------------------------------------------------------- records and predictions

def record_text(record: dict, dataset: str, prediction: dict | None = None, width: int = 48) -> str:
    lines = textwrap.wrap(record["question"], width)[:3]
    for i, c in enumerate(record["choices"]):
        mark = " <- answer" if i == record["answer_index"] else ""
        if prediction is not None and i == prediction["predicted"] and not prediction["correct"]:
            mark = " <- predicted"
        lines.append(textwrap.shorten(f"({LETTERS[i]}) {c}", width) + mark)
    return "\n".join(lines)


def show_records(records: list[dict], image_root: Path, dataset: str, predictions: dict | None = None,
                 columns: int = 4, title: str | None = None):
    """A grid: each record's image (or 'no image') above its question and choices."""
    import matplotlib.pyplot as plt
    from PIL import Image

    n = max(len(records), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, rec in zip(axes.flat, records):
        if rec.get("image"):
            with Image.open(Path(image_root) / rec["image"]) as im:
                ax.imshow(im.convert("RGB"))
        else:
            ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes, color="gray")
        pred = (predictions or {}).get(rec["question_id"])
        head = rec["question_id"] if pred is None else f"{rec['question_id']}: {'right' if pred['correct'] else 'wrong'}"
        ax.set_title(head, fontsize=9, color="black" if pred is None or pred["correct"] else "firebrick")
        ax.text(0, -0.04, record_text(rec, dataset, pred), transform=ax.transAxes, va="top", fontsize=7.5,
                family="monospace")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def read_predictions(run_dir: Path, split: str = "test") -> dict[str, dict]:
    path = Path(run_dir) / f"predictions_{split}.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["question_id"]): r for r in rows}


def right_and_wrong(records: list[dict], predictions: dict, n: int = 4) -> tuple[list[dict], list[dict]]:
    """The first n correctly and n wrongly answered records (in split order)."""
    right = [r for r in records if r["question_id"] in predictions and predictions[r["question_id"]]["correct"]]
    wrong = [r for r in records if r["question_id"] in predictions and not predictions[r["question_id"]]["correct"]]
    return right[:n], wrong[:n]


# ---------------------------------------------------------------- ipywidgets browsers (notebook 00)

def dataset_browser(processed_dir: Path, datasets=("scienceqa", "iconqa")):
    """Browse processed records: image, the prompt as the model sees it, choices and answer."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from .data.records import load_split

    available = [d for d in datasets if (Path(processed_dir) / d / "manifest.json").is_file()]
    if not available:
        return w.HTML(f"No processed data in {processed_dir}: run notebook 01 or `instructblip-peft preprocess`.")
    ds = w.Dropdown(options=available, description="dataset")
    split = w.Dropdown(options=["train", "val", "test"], value="train", description="split")
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

    from .data.records import load_split

    runs = sorted(p.parent for p in Path(outputs_dir).glob("*/*/predictions_test.jsonl"))
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

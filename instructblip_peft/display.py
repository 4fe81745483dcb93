"""What the notebooks show: where LoRA goes, records with their images, a run's predictions. Plain
functions returning text, tables and matplotlib figures; the interactive browsers are in widgets.py."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from .accounting import account
from .artifacts import RunDir
from .data.prompts import LETTERS


# ---------------------------------------------------------------- where LoRA goes

def lora_placement(experiment, preset: str | None = "tiny") -> tuple[pd.DataFrame, dict]:
    """Modules that get LoRA, grouped over layer numbers, and the parameter counts, for `experiment` on
    `preset` (built on the meta device: no download, no memory)."""
    counts = account(experiment, preset, placement=True)
    table = pd.DataFrame([{"LoRA on": k, "modules": v} for k, v in counts.pop("lora_modules").items()],
                         columns=["LoRA on", "modules"])
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
    """A run's predictions of `split` by question id ({} when it has none)."""
    return RunDir(run_dir).predictions_rows(split)


def right_and_wrong(records: list[dict], predictions: dict, n: int = 4) -> tuple[list[dict], list[dict]]:
    """The first n correctly and n wrongly answered records (in split order)."""
    right = [r for r in records if r["question_id"] in predictions and predictions[r["question_id"]]["correct"]]
    wrong = [r for r in records if r["question_id"] in predictions and not predictions[r["question_id"]]["correct"]]
    return right[:n], wrong[:n]

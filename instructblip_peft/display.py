"""What the notebooks show: where LoRA goes, records with their images, a run's predictions. Plain
functions returning text, tables and matplotlib figures; the interactive browsers are in widgets.py."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from .artifacts import RunDir
from .data.prompts import LETTERS


# ---------------------------------------------------------------- where LoRA goes

def lora_placement(experiment, preset: str | None = "tiny") -> tuple[pd.DataFrame, dict]:
    """Modules that get LoRA, grouped over layer numbers, and the parameter counts, for `experiment` on
    `preset` (built on the meta device: no download, no memory)."""
    from .accounting import account  # torch, transformers, peft: only the notebooks that count need them

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
    """A grid: each record's image (framed; or 'no image') with its question and choices right below."""
    import matplotlib.pyplot as plt
    from PIL import Image

    n = max(len(records), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    texts = [record_text(rec, dataset, (predictions or {}).get(rec["question_id"])) for rec in records]
    # Each row: a square image, then a text panel as tall as the row's longest text (monospace 7.5 pt lines).
    lines = [max((t.count("\n") + 1 for t in texts[r * cols:(r + 1) * cols]), default=1) for r in range(rows)]
    side, line = 2.4, 0.135
    ratios = [h for r in range(rows) for h in (side, line * lines[r] + 0.05)]
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.2 * cols, sum(ratios) + 0.35 * rows + (0.4 if title else 0)),
                             squeeze=False, gridspec_kw={"height_ratios": ratios})
    for ax in axes.flat:
        ax.set_axis_off()
    for k, (rec, text) in enumerate(zip(records, texts)):
        ax, text_ax = axes[2 * (k // cols)][k % cols], axes[2 * (k // cols) + 1][k % cols]
        if rec.get("image"):
            with Image.open(Path(image_root) / rec["image"]) as im:
                ax.imshow(im.convert("RGB"))
            # A frame shows where a picture with a white background ends; left-aligned with its text.
            ax.set_anchor("W")
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("#cccccc")
        else:
            ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes, color="gray")
        pred = (predictions or {}).get(rec["question_id"])
        head = rec["question_id"] if pred is None else f"{rec['question_id']}: {'right' if pred['correct'] else 'wrong'}"
        ax.set_title(head, fontsize=9, color="black" if pred is None or pred["correct"] else "firebrick")
        text_ax.text(0, 1, text, transform=text_ax.transAxes, va="top", ha="left", fontsize=7.5, family="monospace")
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.2)
    return fig


def score_lines(record: dict, prediction: dict) -> str:
    """A prediction's candidates with their scores (ranking: summed cross-entropy, lower wins) or its
    generated text, marking the predicted and the true answer."""
    if not prediction.get("scores"):
        return f"generated answer: {prediction.get('generated')!r}"
    choices = [textwrap.shorten(f"({LETTERS[i]}) {c}", 40) for i, c in enumerate(record["choices"])]
    width = max(len(c) for c in choices)
    out = ["candidate scores (summed cross-entropy, lower wins):"]
    for i, (choice, score) in enumerate(zip(choices, prediction["scores"])):
        marks = [m for m, on in (("predicted", i == prediction["predicted"]), ("answer", i == record["answer_index"]))
                 if on]
        out.append(f"  {choice:<{width}}  {score:8.3f}" + (f"  <- {' and '.join(marks)}" if marks else ""))
    return "\n".join(out)


def read_predictions(run_dir: Path, split: str = "test") -> dict[str, dict]:
    """A run's predictions of `split` by question id ({} when it has none)."""
    return RunDir(run_dir).predictions_rows(split)


def right_and_wrong(records: list[dict], predictions: dict, n: int = 4) -> tuple[list[dict], list[dict]]:
    """The first n correctly and n wrongly answered records (in split order)."""
    right = [r for r in records if r["question_id"] in predictions and predictions[r["question_id"]]["correct"]]
    wrong = [r for r in records if r["question_id"] in predictions and not predictions[r["question_id"]]["correct"]]
    return right[:n], wrong[:n]


# ---------------------------------------------------------------- a prediction (predict.py's result)

def prediction_chart(result: dict, image_path: Path | None = None, title: str | None = None):
    """The picture beside the choices ranked as evaluation ranks them: a bar per choice, its share among
    the choices (softmax of minus the summed cross-entropy), the score written on it, the answer
    highlighted. A free (generated) answer is shown as text."""
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 2.2]})
    left.set_axis_off()
    if image_path is not None:
        with Image.open(image_path) as im:
            left.imshow(im.convert("RGB"))
    else:
        left.text(0.5, 0.5, "no image", ha="center", va="center", transform=left.transAxes, color="gray")
    wrapped = "\n".join(textwrap.wrap(result["question"], 60)[:3])
    right.set_title(title or wrapped, fontsize=9, loc="left")
    if "generated" in result:
        right.set_axis_off()
        right.text(0, 0.5, "generated: " + "\n".join(textwrap.wrap(result["generated"], 60)[:6]),
                   transform=right.transAxes, va="center", family="monospace", fontsize=9)
    else:
        labels = [textwrap.shorten(f"({LETTERS[i]}) {c}", 40) for i, c in enumerate(result["choices"])]
        shares = result["probabilities"]
        colours = ["tab:green" if i == result["predicted"] else "tab:gray" for i in range(len(labels))]
        bars = right.barh(range(len(labels)), shares, color=colours)
        right.set_yticks(range(len(labels)), labels, fontsize=9)
        right.invert_yaxis()
        right.set_xlim(0, 1.15)
        right.set_xlabel("share among the choices (softmax of minus the summed cross-entropy)", fontsize=8)
        for bar, share, score in zip(bars, shares, result["scores"]):
            right.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{share:.0%}  (score {score:.3f})",
                       va="center", fontsize=8)
        for side in ("top", "right"):
            right.spines[side].set_visible(False)
    fig.tight_layout()
    return fig

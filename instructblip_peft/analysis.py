"""Collecting finished runs into one table and the paper's figures (notebook 04, `instructblip-peft analyze`).

Works with partial results: every cell of the experiment grid is present in the table; runs that have
not finished are shown as missing, never dropped silently.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .artifacts import RunDir, experiment_of, run_dirs
from .config import load_yaml
from .data.scienceqa import CATEGORIES as SCIENCEQA_CATEGORIES
from .errors import UserError
from .experiments import RANKLESS_METHODS, get_experiment, registry
from .io import atomic_path, write_text
# What write_report saves in <outputs>/analysis/ (figures: <name>.png).
REPORT_FILES = {"csv": "results.csv", "markdown": "results.md"}
TABLE_COLUMNS = ["dataset", "experiment", "method", "llm", "group", "label", "rank", "preset", "status", "val_accuracy",
                 "test_accuracy", "trainable_params", "lora_params", "total_params", "full_qformer_params",
                 "trainable_share", "best_epoch", "epochs_run", "wall_time_s", "run", "run_dir"]
NO_METHOD = "-"   # the method column of a baseline (no adapters) without quantization


def method_of(run_name: str, has_adapters: bool) -> str:
    """The method column from a run directory's name: '28' -> 'lora', '28+dora' -> 'dora', '28+4bit' ->
    'lora+4bit', 'zeroshot-flant5xl' -> '-', 'zeroshot-flant5xl+4bit' -> '4bit'."""
    parts = run_name.split("+")[1:]
    if has_adapters and (not parts or parts[0] in ("4bit", "8bit")):
        parts = ["lora", *parts]
    return "+".join(parts) or NO_METHOD


def _experiment_order() -> dict[str, int]:
    return {eid: i for i, eid in enumerate(registry())}


def read_run(run_dir: Path | RunDir) -> dict:
    """One row for a run directory: its metrics when finished, else its status (running/failed)."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run_dir = run.path
    dataset, name = run_dir.parent.name, run_dir.name
    experiment = experiment_of(name)
    try:
        metrics = run.metrics() or {}
    except UserError:
        metrics = {"status": f"unreadable {run.metrics_file.name}"}
    exp = get_experiment(experiment)
    method = method_of(name, exp.has_lora)
    row = {"dataset": dataset, "experiment": experiment, "method": method, "llm": exp.llm, "group": exp.group,
           "label": exp.label, "rank": None if method.split("+")[0] in RANKLESS_METHODS else exp.rank,
           "status": metrics.get("status") or "unfinished", "run": name, "run_dir": str(run_dir)}
    for key in TABLE_COLUMNS:
        # Identity columns come from the registry.
        if key in metrics and key not in ("dataset", "experiment", "method", "llm", "group", "label", "rank", "run",
                                          "run_dir", "status"):
            row[key] = metrics[key]
    if row.get("trainable_params") is not None and metrics.get("full_qformer_params"):
        row["trainable_share"] = row["trainable_params"] / metrics["full_qformer_params"]
    for split in ("val", "test"):
        for cat, acc in (metrics.get(f"{split}_breakdown") or {}).items():
            row[f"{split}:{cat}"] = acc
    return row


def collect_runs(outputs_dir: str | Path) -> pd.DataFrame:
    """Every run under outputs_dir/<dataset>/<experiment id>/ (finished or not), one row each."""
    rows = [read_run(run) for run in run_dirs(outputs_dir)]
    df = pd.DataFrame(rows)
    for col in TABLE_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype="object")
    if df.empty:
        return df[TABLE_COLUMNS]
    order = _experiment_order()
    df["_order"] = df["experiment"].map(order)
    df["_method"] = df["method"].map(lambda m: (m not in ("lora", NO_METHOD), m))  # the paper's LoRA first
    df = df.sort_values(["dataset", "_order", "_method"]).drop(columns=["_order", "_method"]).reset_index(drop=True)
    extra = [c for c in df.columns if c not in TABLE_COLUMNS]
    return df[TABLE_COLUMNS + extra]


def finished(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "finished"]


SHARE_COLUMN = "trainable params, % of full Q-Former FT"
SHARE_NOTE = (f"{SHARE_COLUMN}: a run's trainable parameters as a percentage of what InstructBLIP's own "
              "fine-tuning trains (the whole Q-Former, query tokens, projection, ln_vision). LLM-LoRA IDs (1-12, "
              "33-44) exceed 100%: the whole Q-Former trains there too, besides the LLM's LoRA.")
# summary_table's numbers as results.md prints them (the Markdown table is what `analyze` shows).
SUMMARY_FORMATS = {"val acc %": ".1f", "test acc %": ".1f", "trainable_params": ",.0f", SHARE_COLUMN: ".2f"}


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """The readable table: one row per run, accuracies in percent (one decimal), the trainable share in
    percent of full Q-Former fine-tuning (SHARE_NOTE)."""
    cols = ["dataset", "experiment", "method", "llm", "label", "rank", "preset", "status", "val_accuracy", "test_accuracy",
            "trainable_params", "trainable_share"]
    out = df[cols].copy()
    for c, decimals in (("val_accuracy", 1), ("test_accuracy", 1), ("trainable_share", 2)):
        out[c] = (pd.to_numeric(out[c], errors="coerce") * 100).round(decimals)
    out = out.rename(columns={"val_accuracy": "val acc %", "test_accuracy": "test acc %",
                              "trainable_share": SHARE_COLUMN})
    out["rank"] = out["rank"].map(lambda r: "-" if r is None or (isinstance(r, float) and math.isnan(r)) else int(r))
    return out


def summary_markdown(df: pd.DataFrame) -> str:
    """summary_table as Markdown, with SHARE_NOTE under it."""
    table = summary_table(df)
    formats = [SUMMARY_FORMATS.get(c, "g") for c in table.columns]
    return table.to_markdown(index=False, floatfmt=formats, intfmt=",") + f"\n\n{SHARE_NOTE}\n"


def methods(df: pd.DataFrame) -> list[str]:
    """The methods of the runs with adapters, LoRA first, then as named."""
    found = set(df.loc[df["method"] != NO_METHOD, "method"].dropna()) if "method" in df else set()
    return sorted(found, key=lambda m: (m != "lora", m)) or ["lora"]


def accuracy_grid(df: pd.DataFrame, dataset: str, llm: str, metric: str = "test_accuracy",
                  method: str = "lora") -> pd.DataFrame:
    """Group (rows, in experiments.yaml order) x rank (columns) of `metric` for one method; NaN where a run is
    missing. A rankless method (IA3) has one column, "-": its ranks are one run."""
    spec = load_yaml("experiments.yaml")
    groups = [g["label"] for g in spec["groups"]]
    rankless = method.split("+")[0] in RANKLESS_METHODS
    ranks = ["-"] if rankless else [int(r) for r in spec["ranks"]]
    grid = pd.DataFrame(float("nan"), index=pd.Index(groups, name="group"), columns=pd.Index(ranks, name="rank"))
    sel = finished(df)
    sel = sel[(sel["dataset"] == dataset) & (sel["llm"] == llm) & (sel["method"] == method)]
    sel = sel[sel["label"].isin(groups)]
    for _, r in sel.iterrows():
        if rankless:
            grid.loc[r["label"], "-"] = float(r[metric])
        elif pd.notna(r["rank"]):
            grid.loc[r["label"], int(r["rank"])] = float(r[metric])
    return grid


def _llms() -> list[tuple[str, str]]:
    return [(x["name"], x["label"]) for x in load_yaml("experiments.yaml")["llms"]]


def plot_heatmaps(df: pd.DataFrame, metric: str = "test_accuracy"):
    """Accuracy by group x rank, one panel per dataset and method (rows) and LLM (columns). Missing runs
    are grey."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    datasets = sorted(df["dataset"].dropna().unique()) or ["(no runs)"]
    panels = [(ds, m) for ds in datasets for m in methods(df)]
    llms = _llms()
    fig, axes = plt.subplots(len(panels), len(llms), figsize=(5.5 * len(llms), 4.2 * len(panels)),
                             squeeze=False)
    for i, (ds, method) in enumerate(panels):
        for j, (llm, llm_label) in enumerate(llms):
            ax = axes[i][j]
            grid = accuracy_grid(df, ds, llm, metric, method) * 100
            ax.set_facecolor("#e6e6e6")  # what shows through the masked (missing) cells
            sns.heatmap(grid, ax=ax, annot=True, fmt=".1f", vmin=0, vmax=100, cmap="viridis",
                        mask=grid.isna(), cbar=j == len(llms) - 1, cbar_kws={"label": "accuracy %"})
            for (r, c) in zip(*grid.isna().to_numpy().nonzero()):
                ax.text(c + 0.5, r + 0.5, "missing", ha="center", va="center", fontsize=7, color="#777777")
            ax.set_title(f"{ds} - {llm_label} - {method}")
            ax.set_xlabel("rank")
            ax.set_ylabel("" if j else "group")
    fig.tight_layout()
    return fig


def plot_share(df: pd.DataFrame, metric: str = "test_accuracy"):
    """Accuracy against trainable share of the full Q-Former (log x), with the full-Q-Former fine-tuning
    and zero-shot baselines as horizontal reference lines."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    done = finished(df).copy()
    datasets = sorted(done["dataset"].unique()) or ["(no runs)"]
    llms = _llms()
    fig, axes = plt.subplots(len(datasets), len(llms), figsize=(6 * len(llms), 4.2 * len(datasets)), squeeze=False)
    for i, ds in enumerate(datasets):
        for j, (llm, llm_label) in enumerate(llms):
            ax = axes[i][j]
            sel = done[(done["dataset"] == ds) & (done["llm"] == llm)]
            lora = sel[sel["method"] != NO_METHOD].copy()
            lora["accuracy %"] = lora[metric].astype(float) * 100
            lora["trainable share %"] = lora["trainable_share"].astype(float) * 100
            if not lora.empty:
                many = lora["method"].nunique() > 1  # one marker per method when there are several
                sns.scatterplot(data=lora, x="trainable share %", y="accuracy %", hue="label",
                                size="rank" if lora["rank"].notna().any() else None, sizes=(30, 160),
                                style="method" if many else None, ax=ax, legend="brief")
                ax.set_xscale("log")  # only where there are points: an empty axis claims no scale
            for group, style in (("qformer-ft", "-"), ("zeroshot", ":")):
                base = sel[(sel["group"] == group) & (sel["method"] == NO_METHOD)]
                if not base.empty:
                    ax.axhline(float(base[metric].iloc[0]) * 100, color="black", ls=style, lw=1,
                               label=base["label"].iloc[0])
            ax.set_title(f"{ds} - {llm_label}")
            ax.set_xlabel("trainable parameters, % of full Q-Former fine-tuning"
                          + (" (log scale)" if ax.get_xscale() == "log" else ""))
            ax.set_ylabel("accuracy %")
            if lora.empty and sel.empty:  # no scale to claim: no ticks either
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def category_table(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """ScienceQA accuracy (%) per question category, one row per finished run. Categories without a
    question in any run (e.g. NO and TXT in the image-only subset) are left out."""
    sel = finished(df)
    sel = sel[sel["dataset"] == "scienceqa"]
    cols = [f"{split}:{c}" for c in SCIENCEQA_CATEGORIES]
    out = pd.DataFrame(index=pd.Index([_run_name(r) for _, r in sel.iterrows()], name="run"),
                       columns=SCIENCEQA_CATEGORIES, dtype=float)
    for name, (_, r) in zip(out.index, sel.iterrows()):
        for cat, col in zip(SCIENCEQA_CATEGORIES, cols):
            if col in r and pd.notna(r[col]):
                out.loc[name, cat] = float(r[col]) * 100
    return out.dropna(axis=1, how="all")


def _run_name(row) -> str:
    rank = "" if pd.isna(row["rank"]) else f" r{int(row['rank'])}"
    return f"{row['experiment']}: {row['label']}{rank}"


def plot_categories(df: pd.DataFrame, split: str = "test"):
    """ScienceQA category bars (NAT, SOC, LAN, TXT, IMG, NO, G1-6, G7-12: those with questions) per finished run."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = category_table(df, split)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    if table.empty:
        ax.text(0.5, 0.5, "no finished ScienceQA runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    long = table.reset_index().melt(id_vars="run", var_name="category", value_name="accuracy %")
    sns.barplot(data=long, x="category", y="accuracy %", hue="run", ax=ax)
    ax.set_ylim(0, 100)
    ax.set_title(f"ScienceQA {split} accuracy by category")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def adalora_runs(df: pd.DataFrame) -> list[pd.DataFrame]:
    """The sublayer-importance data (importance.read_adalora_ranks) of every finished AdaLoRA run in `df`."""
    from .importance import read_adalora_ranks

    sel = finished(df)
    sel = sel[sel["method"].astype(str).str.startswith("adalora")]
    return [read_adalora_ranks(d) for d in sel["run_dir"] if RunDir(d).adalora_ranks.is_file()]


FIGURES = {"heatmap": plot_heatmaps, "share": plot_share, "scienceqa_categories": plot_categories}


def write_report(df: pd.DataFrame, out_dir: str | Path, figures: dict | None = None) -> dict[str, Path]:
    """results.csv (every column), results.md (the summary table), the three figures as PNG (<name>.png for
    each name of FIGURES; `figures`: those already drawn from `df`, by name, the rest are drawn here), and one
    sublayer-importance figure per AdaLoRA run (adalora_<dataset>_<run>.png)."""
    from .importance import importance_figure
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    write_text(paths["csv"], df.to_csv(index=False))
    write_text(paths["markdown"], summary_markdown(df))
    for name, plot in FIGURES.items():
        fig = (figures or {}).get(name)
        fig = plot(df) if fig is None else fig
        paths[name] = save_figure(fig, out_dir / f"{name}.png")
        plt.close(fig)
    for ranks in adalora_runs(df):
        name = f"adalora_{ranks['dataset'].iloc[0]}_{ranks['run'].iloc[0]}"
        fig = importance_figure(ranks)
        paths[name] = save_figure(fig, out_dir / f"{name}.png")
        plt.close(fig)
    return paths

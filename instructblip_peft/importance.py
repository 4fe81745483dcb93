"""AdaLoRA's rank allocation and importance scores: kept through training, saved with the run, and drawn.

The paper's sublayer-importance analysis: AdaLoRA starts every adapted module at the same initial rank and
prunes the least important singular triplets (importance: smoothed sensitivity x uncertainty of P, Lambda
and Q) until the average rank is the experiment's. Which Q-Former layers and sublayers keep their ranks,
and how much of the budget goes to the LLM, shows where fine-tuning matters.

- During training, `method_state(model, settings)` gives the hook that train.py calls after every optimizer
  step (AdaLoRA's `update_and_allocate`), and the state a checkpoint must carry for an exact resume (the
  smoothed scores and the rank pattern). For other methods it does nothing.
- At the end of a run, `write_adalora_ranks` saves every adapted module's final rank and importance to
  `artifacts.ADALORA_RANKS` (JSON) in the run directory, and a figure beside it.
- `read_adalora_ranks(run_dir)` / `collect_adalora_ranks(outputs)` give a tidy DataFrame;
  `plot_rank_heatmap` and `importance_figure` draw the Q-Former layer x sublayer heatmap and the LLM's share.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import torch

from .errors import UserError
from .io import read_json, write_json

ADAPTER = "default"

# Q-Former sublayers, in the order of a layer's forward pass: (label, pattern after `qformer.encoder.layer.N.`).
QFORMER_SUBLAYERS = [
    ("self-attn query", r"attention\.attention\.query"),
    ("self-attn value", r"attention\.attention\.value"),
    ("cross-attn query", r"crossattention\.attention\.query"),
    ("cross-attn key", r"crossattention\.attention\.key"),
    ("cross-attn value", r"crossattention\.attention\.value"),
    ("cross-attn output", r"crossattention\.output\.dense"),
    ("FFN intermediate", r"intermediate\.dense"),
    ("FFN output", r"output\.dense"),
    ("FFN intermediate (query)", r"intermediate_query\.dense"),
    ("FFN output (query)", r"output_query\.dense"),
]
_QFORMER = re.compile(r"qformer\.encoder\.layer\.(\d+)\.(.+)")
_T5 = re.compile(r"language_model\.(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.(\w+)\.(\w+)")
_LLAMA = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)")


# ---------------------------------------------------------------- during training

class MethodState:
    """Training-time state of a peft method beyond its weights and optimizer (none for most methods)."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based), before the gradients are cleared."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able) to write into a checkpoint."""
        return {}, {}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what `state` returned."""

    def write_results(self, output_dir: Path) -> None:
        """Write the method's own results into a finished run's directory."""


class AdaLoraState(MethodState):
    """AdaLoRA's rank allocator: peft's update_and_allocate after each optimizer step; its smoothed scores,
    the rank pattern, and the scores the final allocation used (peft clears them right after) persist."""

    _KINDS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, model):
        self.tuner = model.base_model                 # peft's AdaLoraModel
        self.config = self.tuner.peft_config[ADAPTER]
        self.allocator = self.tuner.rankallocator
        self.final_scores: dict[str, list[float]] | None = None   # per module: one score per triplet
        self.final_step: int | None = None

    @property
    def final_allocation_step(self) -> int:
        return self.config.total_step - self.config.tfinal

    def after_optimizer_step(self, step: int) -> None:
        if step == self.final_allocation_step:
            # The final allocation ranks these scores, then peft resets them: keep them for the analysis.
            self.final_scores, self.final_step = triplet_scores(self.allocator), step
        self.tuner.update_and_allocate(step)

    def state(self):
        tensors = {f"{kind}.{name}": t for kind in self._KINDS for name, t in getattr(self.allocator, kind).items()}
        return tensors, {"rank_pattern": self.config.rank_pattern, "final_scores": self.final_scores,
                         "final_step": self.final_step}

    def load(self, tensors, meta):
        for kind in self._KINDS:
            setattr(self.allocator, kind, {k[len(kind) + 1:]: v for k, v in tensors.items()
                                           if k.split(".", 1)[0] == kind})
        self.config.rank_pattern = meta.get("rank_pattern")
        self.final_scores, self.final_step = meta.get("final_scores"), meta.get("final_step")

    def write_results(self, output_dir: Path) -> None:
        from .artifacts import ADALORA_RANKS_FIGURE
        write_adalora_ranks(Path(output_dir), self)
        importance_figure(read_adalora_ranks(output_dir), Path(output_dir) / ADALORA_RANKS_FIGURE)


def method_state(model, settings) -> MethodState:
    if settings.get("peft_method") == "adalora" and hasattr(model, "base_model") \
            and hasattr(model.base_model, "rankallocator"):
        return AdaLoraState(model)
    return MethodState()


def triplet_scores(allocator) -> dict[str, list[float]]:
    """Per adapted module, the importance of each of its singular triplets (P column, lambda, Q row), as
    peft's allocator ranks them: the smoothed score of lambda plus the mean scores of the row of A and the
    column of B. Empty before the first update."""
    if not allocator.exp_avg_ipt:
        return {}
    out = {}
    for name in allocator.exp_avg_ipt:
        if f".lora_E.{ADAPTER}" not in name:
            continue
        e = allocator._element_score(name).view(-1)
        a = allocator._element_score(name.replace("lora_E", "lora_A")).mean(dim=1)
        b = allocator._element_score(name.replace("lora_E", "lora_B")).mean(dim=0)
        out[_module_of(name)] = (e + a + b).float().tolist()
    return out


def _module_of(param_name: str) -> str:
    """'...query.lora_E.default' or '...query.lora_E' -> '...query'."""
    return re.sub(r"\.lora_[A-Z](\.\w+)?$", "", param_name)


@contextlib.contextmanager
def full_rank_adapter(model):
    """Save an AdaLoRA adapter at its initial rank, pruned triplets as zeros. peft would otherwise cut the
    tensors to the last rank pattern, which differs from the saved (best-val) weights when those predate
    the final allocation: the reloaded model must reproduce the test predictions exactly. The allocation
    itself is saved in ADALORA_RANKS."""
    from peft import AdaLoraConfig

    configs = {k: c for k, c in getattr(model, "peft_config", {}).items() if isinstance(c, AdaLoraConfig)}
    saved = {k: c.rank_pattern for k, c in configs.items()}
    try:
        for c in configs.values():
            c.rank_pattern = None
        yield
    finally:
        for k, c in configs.items():
            c.rank_pattern = saved[k]


# ---------------------------------------------------------------- the saved file

def write_adalora_ranks(output_dir: Path, state: AdaLoraState) -> Path:
    """Every adapted module's final rank (peft's rank pattern) and importance, with the schedule."""
    from .artifacts import ADALORA_RANKS

    cfg = state.config
    pattern = {_module_of(k): [bool(x) for x in v] for k, v in (cfg.rank_pattern or {}).items()}
    if state.final_scores is not None:
        scores, allocated = state.final_scores, "final"
    else:  # the run stopped (early stopping, max_steps) before the final allocation
        scores, allocated = triplet_scores(state.allocator), ("intermediate" if pattern else "none")
    modules = sorted({_module_of(n) for n, _ in state.tuner.model.named_parameters() if f".lora_E.{ADAPTER}" in n})
    out = {
        "init_rank": cfg.init_r, "target_rank": cfg.target_r, "total_steps": cfg.total_step, "tinit": cfg.tinit,
        "tfinal": cfg.tfinal, "delta_t": cfg.deltaT, "final_allocation_step": state.final_step,
        # final: ranks and scores of the last allocation; intermediate: the run stopped during pruning
        # (the latest allocation); none: it stopped before pruning began (every module at its initial rank).
        "allocation": allocated,
        "modules": {m: {"rank": sum(pattern[m]) if m in pattern else cfg.init_r,
                        "kept": pattern.get(m, [True] * cfg.init_r),
                        "importance": scores.get(m)} for m in modules},
    }
    path = Path(output_dir) / ADALORA_RANKS
    write_json(path, out)
    return path


# ---------------------------------------------------------------- reading and drawing

def sublayer_of(module: str) -> dict:
    """{'component', 'layer', 'sublayer'} of an adapted module's name."""
    m = _QFORMER.fullmatch(module)
    if m:
        for label, pat in QFORMER_SUBLAYERS:
            if re.fullmatch(pat, m.group(2)):
                return {"component": "qformer", "layer": int(m.group(1)), "sublayer": label}
    m = _T5.fullmatch(module)
    if m:
        return {"component": "llm", "layer": int(m.group(2)), "sublayer": f"{m.group(1)} {m.group(3)}.{m.group(4)}"}
    m = _LLAMA.fullmatch(module)
    if m:
        return {"component": "llm", "layer": int(m.group(1)), "sublayer": f"{m.group(2)}.{m.group(3)}"}
    return {"component": "other", "layer": None, "sublayer": module}


def read_adalora_ranks(run_dir):
    """A finished AdaLoRA run's ranks as a tidy DataFrame: one row per adapted module with dataset,
    experiment, run (the directory's name), module, component (qformer | llm), layer, sublayer, rank,
    init_rank, importance (sum of its triplets' scores; NaN when no scores were kept)."""
    import pandas as pd

    from .artifacts import ADALORA_RANKS, RUN_INFO

    run_dir = Path(run_dir)
    path = run_dir / ADALORA_RANKS
    if not path.is_file():
        raise UserError(f"{path}: not found; only finished AdaLoRA runs (-p peft_method adalora) have it")
    data = read_json(path, "AdaLoRA ranks")
    info = read_json(run_dir / RUN_INFO, "run info") if (run_dir / RUN_INFO).is_file() else {}
    rows = []
    for module, m in data["modules"].items():
        scores = m.get("importance")
        rows.append({"dataset": info.get("dataset"), "experiment": info.get("experiment"), "run": run_dir.name,
                     "module": module, **sublayer_of(module), "rank": m["rank"], "init_rank": data["init_rank"],
                     "importance": float(sum(scores)) if scores else math.nan})
    return pd.DataFrame(rows)


def collect_adalora_ranks(outputs_dir):
    """read_adalora_ranks of every run under outputs_dir (<dataset>/<run>/) that has the file, concatenated."""
    import pandas as pd

    from .artifacts import ADALORA_RANKS

    frames = [read_adalora_ranks(p.parent) for p in sorted(Path(outputs_dir).glob(f"*/*/{ADALORA_RANKS}"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["dataset", "experiment", "run", "module", "component", "layer", "sublayer", "rank", "init_rank",
                 "importance"])


def llm_share(df) -> float:
    """The LLM's share of the final rank budget (0 when only the Q-Former is adapted)."""
    total = df["rank"].sum()
    return float(df.loc[df["component"] == "llm", "rank"].sum() / total) if total else 0.0


def qformer_grid(df, value: str = "rank"):
    """Q-Former layer (rows) x sublayer (columns, forward order) table of `value`; NaN where a layer has no
    such adapted sublayer (cross-attention is in every other layer)."""
    q = df[df["component"] == "qformer"]
    order = [label for label, _ in QFORMER_SUBLAYERS if label in set(q["sublayer"])]
    return q.pivot_table(index="layer", columns="sublayer", values=value, aggfunc="mean").reindex(columns=order)


def plot_rank_heatmap(df, value: str = "rank", ax=None, title: str | None = None):
    """The Q-Former layer x sublayer heatmap of `value` (rank or importance) for one run's rows."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = qformer_grid(df, value)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.75 * max(len(grid.columns), 1), 0.9 + 0.4 * max(len(grid), 1)))
    if grid.empty:
        ax.text(0.5, 0.5, "no Q-Former adapters", ha="center", va="center")
        ax.set_axis_off()
        return ax
    sns.heatmap(grid, annot=value == "rank", fmt=".0f", cmap="viridis", ax=ax,
                cbar_kws={"label": "final rank" if value == "rank" else "importance"})
    ax.set_xlabel("")
    ax.set_ylabel("Q-Former layer")
    ax.tick_params(axis="x", labelrotation=45)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    if title is not None:
        ax.set_title(title)
    return ax


def importance_figure(df, path=None):
    """One run: Q-Former final ranks and importance as heatmaps, and the share of the rank budget held by
    the LLM vs the Q-Former. Saved to `path` when given; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [5, 5, 1.4]})
    name = f"{df['dataset'].iloc[0]} {df['run'].iloc[0]}" if len(df) else ""
    plot_rank_heatmap(df, "rank", axes[0], title=f"{name}: final rank (initial {int(df['init_rank'].max())})")
    if df["importance"].notna().any():
        plot_rank_heatmap(df, "importance", axes[1], title="importance (sensitivity x uncertainty)")
    else:
        axes[1].text(0.5, 0.5, "no importance scores (the run stopped before pruning)", ha="center", va="center")
        axes[1].set_axis_off()
    share = llm_share(df)
    axes[2].bar(["Q-Former", "LLM"], [100 * (1 - share), 100 * share], color=["tab:blue", "tab:orange"])
    axes[2].set_ylabel("% of the final rank budget")
    axes[2].set_ylim(0, 100)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig

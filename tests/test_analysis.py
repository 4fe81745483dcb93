"""The results table and figures from hand-made run directories (no training)."""
import json

import pandas as pd

from instructblip_peft import analysis


def fake_run(outputs, dataset, experiment, test_acc, trainable=1000, status="finished"):
    d = outputs / dataset / experiment
    d.mkdir(parents=True)
    breakdown = {"NAT": 0.5, "SOC": 0.25, "LAN": 1.0, "IMG": 0.5, "G1-6": 0.5} if dataset == "scienceqa" else {}
    (d / "metrics.json").write_text(json.dumps({
        "dataset": dataset, "experiment": experiment, "preset": "tiny-t5", "status": status,
        "val_accuracy": test_acc, "test_accuracy": test_acc, "val_breakdown": breakdown,
        "test_breakdown": breakdown, "trainable_params": trainable, "lora_params": 10, "total_params": 10**6,
        "full_qformer_params": 10**4, "best_epoch": 1, "epochs_run": 1}))
    return d


def test_partial_results_show_missing_cells_and_write_every_file(tmp_path):
    outputs = tmp_path / "outputs"
    fake_run(outputs, "scienceqa", "15", 0.5)
    fake_run(outputs, "scienceqa", "zeroshot-flant5xl", 0.25, trainable=0)
    fake_run(outputs, "scienceqa", "qformer-ft-flant5xl", 0.75, trainable=10**4)
    fake_run(outputs, "iconqa", "40", 0.6)
    (outputs / "scienceqa" / "16").mkdir()          # a started run: listed as unfinished
    (outputs / "scienceqa" / "16" / "train_log.csv").write_text("step,epoch,loss,lr\n")
    (outputs / "analysis").mkdir()                   # not a run directory

    df = analysis.collect_runs(outputs)
    assert set(df["experiment"]) == {"15", "16", "zeroshot-flant5xl", "qformer-ft-flant5xl", "40"}
    assert df.set_index("experiment").loc["16", "status"] == "unfinished"
    assert df.set_index("experiment").loc["15", "trainable_share"] == 0.1

    grid = analysis.accuracy_grid(df, "scienceqa", "flant5xl")
    assert grid.shape == (8, 4)
    assert grid.loc["Q-Former LoRA ffn", 4] == 0.5          # ID 15: Q-Former ffn, rank 4
    assert grid.isna().sum().sum() == 31                     # everything else is missing

    paths = analysis.write_report(df, tmp_path / "analysis")
    for key in ("csv", "markdown", "heatmap", "share", "scienceqa_categories"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    table = pd.read_csv(paths["csv"])
    assert len(table) == 5
    assert "| scienceqa" in paths["markdown"].read_text()


def test_no_runs_at_all_still_gives_an_empty_table_and_figures(tmp_path):
    df = analysis.collect_runs(tmp_path / "nothing")
    assert df.empty
    paths = analysis.write_report(df, tmp_path / "analysis")
    assert paths["heatmap"].is_file()


def test_category_table_lists_scienceqa_runs_only(tmp_path):
    fake_run(tmp_path, "scienceqa", "15", 0.5)
    fake_run(tmp_path, "iconqa", "15", 0.5)
    table = analysis.category_table(analysis.collect_runs(tmp_path))
    assert list(table.index) == ["15: Q-Former LoRA ffn r4"]
    assert table.loc["15: Q-Former LoRA ffn r4", "LAN"] == 100.0
    # Categories without questions leave no empty slot in the bars.
    assert list(table.columns) == ["NAT", "SOC", "LAN", "IMG", "G1-6"]


def test_methods_are_a_dimension_of_the_analysis(tmp_path):
    """28 (LoRA), 28+dora and 25+ia3 are three rows with their method; the heatmaps get one panel row per
    method and IA3's ranks are one column."""
    from instructblip_peft import analysis

    for name, acc in (("28", 0.5), ("28+dora", 0.6), ("25+ia3", 0.4)):
        d = tmp_path / "scienceqa" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"status": "finished", "preset": "tiny-t5", "val_accuracy": acc,
                                                    "test_accuracy": acc, "trainable_params": 10,
                                                    "full_qformer_params": 100}))
    runs = analysis.collect_runs(tmp_path)
    assert list(zip(runs["run"], runs["method"], runs["experiment"])) == [
        ("25+ia3", "ia3", "25"), ("28", "lora", "28"), ("28+dora", "dora", "28")]
    assert analysis.methods(runs) == ["lora", "dora", "ia3"]
    label = runs.loc[runs["run"] == "28", "label"].iloc[0]
    assert analysis.accuracy_grid(runs, "scienceqa", "flant5xl", method="dora").loc[label, 8] == 0.6  # ID 28: rank 8
    assert list(analysis.accuracy_grid(runs, "scienceqa", "flant5xl", method="ia3").columns) == ["-"]
    fig = analysis.plot_heatmaps(runs)
    assert len(fig.axes) >= 3 * 2  # (dataset x method) rows x LLM columns, plus colour bars


def test_table_rounds_accuracies_and_says_what_the_share_is(tmp_path):
    fake_run(tmp_path, "scienceqa", "11", 2 / 3, trainable=15_000)    # LLM LoRA: the whole Q-Former trains
    fake_run(tmp_path, "scienceqa", "27", 0.123456, trainable=25)
    runs = analysis.collect_runs(tmp_path)
    table = analysis.summary_table(runs).set_index("experiment")
    assert table.loc["11", "test acc %"] == 66.7 and table.loc["27", "test acc %"] == 12.3
    assert table.loc["11", analysis.SHARE_COLUMN] == 150.0 and table.loc["27", analysis.SHARE_COLUMN] == 0.25
    markdown = analysis.summary_markdown(runs)
    assert " 66.7 |" in markdown and " 15,000 |" in markdown and "66.67" not in markdown
    assert "exceed 100%" in markdown.splitlines()[-1]


def test_an_empty_share_plot_claims_no_log_scale():
    fig = analysis.plot_share(analysis.collect_runs("/nonexistent"))
    assert all(ax.get_xscale() == "linear" and "log" not in ax.get_xlabel() for ax in fig.axes)

"""The CLI end to end on the bundled sample with the tiny presets: run (twice), sweep past a failure,
analyze partial results; and one-line errors for user mistakes."""
import json

import pytest

from instructblip_peft import cli

FAST = ["--preset", "tiny", "-p", "max_steps", "2", "-p", "max_eval_samples", "8"]


@pytest.mark.parametrize("argv, message", [
    (["run", "scienceqa", "99"], "unknown experiment ID '99'"),
    (["run", "scienceqa", "27", "-p", "learning_rat", "1e-4"], "unknown setting 'learning_rat'"),
    (["run", "scienceqa", "27", "-p", "epochs", "many"], "setting 'epochs' must be int"),
    (["run", "nope", "27"], "unknown dataset 'nope'"),
    (["run", "scienceqa", "40", "--preset", "tiny-t5"], "preset 'tiny-t5' is a t5 model"),
    (["sweep", "scienceqa", "1-4", "--shard", "5/4"], "bad --shard '5/4'"),
    (["sweep", "scienceqa", "1-70"], "unknown experiment ID '65'"),
    (["preprocess", "scienceqa", "-p", "epochs", "3"], "preprocess takes only keep_text_only, skip_invalid"),
    (["preprocess", "iconqa", "--raw", "hub:someone/IconQA"], "hub datasets are supported for scienceqa only"),
])
def test_user_errors_are_one_line_without_traceback(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_run_without_processed_data_says_what_to_do(tmp_path, capsys):
    assert cli.main(["run", "iconqa", "27", "--processed", str(tmp_path)]) == 2
    assert "run `instructblip-peft preprocess iconqa` first" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-v", "run", "scienceqa", "99"], ["run", "scienceqa", "99", "-v"]])
def test_verbose_shows_the_traceback(argv):
    with pytest.raises(Exception, match="unknown experiment ID"):
        cli.main(argv)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    path = tmp_path_factory.mktemp("processed")
    assert cli.main(["preprocess", "scienceqa", "--processed", str(path), "-p", "skip_invalid", "true"]) == 0
    assert json.loads((path / "scienceqa" / "manifest.json").read_text())["options"]["skip_invalid"] is True
    assert (path / "scienceqa" / "01_preprocess.ipynb").is_file()
    return path


def test_run_twice_sweep_past_a_failure_and_analyze_partial_results(processed, tmp_path, capsys):
    outputs = tmp_path / "outputs"
    where = ["--outputs", str(outputs), "--processed", str(processed)]
    run_dir = outputs / "scienceqa" / "27"

    assert cli.main(["run", "scienceqa", "27", *FAST, *where]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["preset"] == "tiny-t5"
    for name in ("02_train.ipynb", "03_results.ipynb", "predictions_test.jsonl"):
        assert (run_dir / name).is_file()
    executed = json.loads((run_dir / "02_train.ipynb").read_text())
    injected = next(c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert 'overrides = {"max_steps": 2' in "".join(injected["source"])   # the -p settings, whole
    stamps = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    capsys.readouterr()

    assert cli.main(["run", "scienceqa", "27", *FAST, *where]) == 0      # finished: nothing runs again
    assert "already finished" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == stamps

    # A finished tiny run does not pass for the real model's run.
    assert cli.main(["run", "scienceqa", "27", *where]) == 2
    assert "holds a finished run of preset 'tiny-t5', not 'flant5xl'" in capsys.readouterr().err

    # 31 cannot write its executed notebook (a directory is in the way): the sweep reports it and goes on.
    (outputs / "scienceqa" / "31" / "02_train.ipynb").mkdir(parents=True)
    assert cli.main(["sweep", "scienceqa", "31,zeroshot-flant5xl,27", *FAST, *where]) == 1
    out, err = capsys.readouterr()
    assert "1 finished, 1 already finished, 1 failed" in out
    assert "failed 31" in err and "02_train.ipynb" in err
    assert json.loads((outputs / "scienceqa" / "zeroshot-flant5xl" / "metrics.json").read_text())["status"] == \
        "finished"

    assert cli.main(["analyze", "--outputs", str(outputs)]) == 0
    table = (outputs / "analysis" / "results.md").read_text()
    assert "zeroshot-flant5xl" in table and "unfinished" in table     # 31 is shown, as not finished
    for name in ("results.csv", "heatmap.png", "share.png", "scienceqa_categories.png", "04_analysis.ipynb"):
        assert (outputs / "analysis" / name).is_file()

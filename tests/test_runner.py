"""The papermill runner on trivial notebooks: parameters in, failures reported with notebook and cell."""
import json

import nbformat
import pytest

from instructblip_peft import runner
from instructblip_peft.errors import UserError


def test_overrides_are_checked_before_any_notebook_and_travel_typed(tmp_path):
    (tmp_path / "scienceqa").mkdir()
    (tmp_path / "scienceqa" / "manifest.json").write_text("{}")
    plan = runner.plan_run("scienceqa", "27", "tiny", {"max_steps": "2", "learning_rate": "1e-4"}, tmp_path, tmp_path)
    assert plan.overrides == {"max_steps": 2, "learning_rate": 1e-4}
    with pytest.raises(UserError, match="unknown setting 'nope'"):
        runner.plan_run("scienceqa", "27", "tiny", {"nope": 1}, tmp_path, tmp_path)


def test_the_notebook_gets_the_overrides_whole(tmp_path, monkeypatch):
    """The notebook's own interactive limits (max_steps 4, ...) are replaced, not merged: a CLI run
    without -p max_steps trains to the end."""
    calls = []
    monkeypatch.setattr(runner, "execute", lambda key, output, params, progress=True: calls.append((key, params)))
    runner.execute_run(runner.RunPlan("scienceqa", "27", "tiny", {"learning_rate": 1e-4}, tmp_path, tmp_path))
    assert calls[0][1]["overrides"] == {"learning_rate": 1e-4}
    assert "max_steps" not in calls[0][1]


def test_shards_split_the_list_without_overlap():
    ids = [str(i) for i in range(1, 11)]
    shards = [runner.shard_ids(ids, runner.parse_shard(f"{k}/3")) for k in (1, 2, 3)]
    assert sorted(sum(shards, []), key=int) == ids
    assert shards[0] == ["1", "4", "7", "10"]
    for bad in ("0/3", "4/3", "x", "1/0"):
        with pytest.raises(UserError, match="--shard"):
            runner.parse_shard(bad)


@pytest.fixture
def trivial_notebooks(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('value = 1\nfail = False')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("doubled = value * 2\nprint('doubled', doubled)"),
                nbformat.v4.new_code_cell("if fail:\n    raise ValueError(f'bad value {value}')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "nb").mkdir()
    nbformat.write(nb, tmp_path / "nb" / "trivial.ipynb")
    settings = {**runner.runner_settings(), "notebooks": {"trivial": "trivial.ipynb"}}
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", tmp_path / "nb")
    monkeypatch.setattr(runner, "runner_settings", lambda: settings)
    return tmp_path


def test_parameters_reach_the_notebook_and_a_failure_names_notebook_cell_and_record(trivial_notebooks):
    out = trivial_notebooks / "runs" / "ok.ipynb"
    runner.execute("trivial", out, {"value": 21}, progress=False)
    outputs = json.loads(out.read_text())["cells"][2]["outputs"]   # after papermill's injected cell
    assert "doubled 42" in "".join(outputs[0]["text"])

    failed = trivial_notebooks / "runs" / "failed.ipynb"
    with pytest.raises(runner.NotebookFailed) as e:
        runner.execute("trivial", failed, {"value": 5, "fail": True}, progress=False)
    message = str(e.value)
    assert "trivial.ipynb failed at cell 4" in message       # parameters, injected, doubled, raise
    assert "ValueError: bad value 5" in message
    assert str(failed) in message and failed.is_file()       # the executed notebook is kept to look at


def test_under_a_multi_process_launch_only_rank_0_writes_the_record(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "execute", lambda key, output, params, progress=True: calls.append((key, output)))
    plan = runner.RunPlan("scienceqa", "27", "tiny", {}, tmp_path, tmp_path)
    monkeypatch.setenv("RANK", "1")
    runner.execute_run(plan)
    assert calls == [("train", tmp_path / "scienceqa" / "27" / ".rank1" / "02_train.ipynb")]
    calls.clear()
    monkeypatch.setenv("RANK", "0")
    runner.execute_run(plan)
    assert [(k, o.name) for k, o in calls] == [("train", "02_train.ipynb"), ("results", "03_results.ipynb")]

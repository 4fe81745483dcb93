"""Faults and bad input, as a user meets them: training killed at chosen points (mid-step, mid-checkpoint
write, between the checkpoint's renames, mid-evaluation) ends like an uninterrupted run; a killed sweep
resumes without touching finished runs; a full disk or read-only directory is one clear error with the
previous checkpoint intact; two runs on one directory; a table of CLI mistakes, each one line and nothing
written; a real preset without network; same seed, same run."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructblip_peft import checkpoint as ckpt
from instructblip_peft.artifacts import LOCK, RunLock
from instructblip_peft import cli
from instructblip_peft.errors import UserError
from instructblip_peft.train import train

from raw_fixtures import edit_problems, scienceqa_raw
from train_fixtures import EXPERIMENT, FAST, SETTINGS, SINGLE_THREAD_ENV, assert_same_run, final_state

# Fixtures from conftest.py: data (the processed colour dataset), uninterrupted (final_state of the same run
# never interrupted).

TESTS_DIR = Path(__file__).parent
ENV = {**os.environ, **SINGLE_THREAD_ENV}

# Runs train() in a subprocess with one fault planted inside it (nothing in the product code knows):
#   step N      SIGKILL at the N-th optimizer step (gradients computed, weights not yet updated)
#   write N     SIGKILL in the N-th checkpoint write, after trainable.safetensors is in checkpoint.tmp/
#   rename N    SIGKILL in the N-th checkpoint write between its two renames (checkpoint/ moved aside)
#   eval N      SIGKILL on entering the N-th evaluation (val after each epoch, then test)
#   hold N      at the N-th evaluation, write a marker file and wait (holding the run's lock)
DRIVER = r"""
import json, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import train_fixtures  # single-threaded like the test process
import torch
from instructblip_peft import checkpoint, evaluate
from instructblip_peft.train import train

mode, nth, out, data, settings = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
calls = [0]

def nth_call():
    calls[0] += 1
    return calls[0] == nth

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "step":
    real_step = torch.optim.AdamW.step
    def step(self, *a, **k):
        if nth_call():
            die()
        return real_step(self, *a, **k)
    torch.optim.AdamW.step = step
elif mode == "write":
    real_save = checkpoint.save_tensors
    def save_tensors(path, tensors):
        if Path(path).parent.name == "checkpoint.tmp" and Path(path).name == checkpoint.OPTIMIZER and nth_call():
            die()
        return real_save(path, tensors)
    checkpoint.save_tensors = save_tensors
elif mode == "rename":
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if str(src).endswith("checkpoint.tmp") and nth_call():
            die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
elif mode in ("eval", "hold"):
    real_evaluate = evaluate.evaluate
    def evaluate_(*a, **k):
        if nth_call():
            if mode == "eval":
                die()
            Path(out, "holding").write_text(str(os.getpid()))
            time.sleep(120)
        return real_evaluate(*a, **k)
    evaluate.evaluate = evaluate_
train("scienceqa", sys.argv[7], out, dataset_dir=data, preset="tiny", progress=False, **settings)
"""


def start_driver(mode: str, nth: int, out: Path, data: Path, settings: dict, experiment: str = EXPERIMENT):
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(TESTS_DIR), mode, str(nth), str(out), str(data),
                             json.dumps(settings), experiment],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_until_killed(mode: str, nth: int, out: Path, data: Path, settings: dict = SETTINGS) -> None:
    proc = start_driver(mode, nth, out, data, settings)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"not killed ({mode} {nth}): {err.decode()[-2000:]}"


def leftovers(out: Path) -> list[str]:
    """Half-written files a later run could trip over (temp files of io.atomic_path)."""
    return sorted(p.name for p in out.rglob("*.tmp") if p.is_file())


# 3 epochs of 4 steps; checkpoints (in order): step 2, end of epoch 1 (step 4), 6, end of epoch 2 (step 8), ...
# (a step that ends an epoch is checkpointed once, after the val evaluation); evaluations: val after each
# epoch, then test.
KILL_POINTS = {
    "mid-step": ("step", 7),                      # epoch 2, one step after the step-6 checkpoint
    "mid-checkpoint-write": ("write", 3),         # the step-6 checkpoint, half in checkpoint.tmp/
    "between-checkpoint-renames": ("rename", 4),  # end of epoch 2: checkpoint/ moved to checkpoint.old/, new one
                                                  # not in place
    "mid-validation": ("eval", 2),                # epoch 2's val evaluation (all its batches consumed)
    "mid-test-evaluation": ("eval", 4),           # training done, best/ written, metrics not yet
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_at_a_chosen_point_resumes_to_the_same_end(point, data, uninterrupted, tmp_path):
    run_until_killed(*KILL_POINTS[point], tmp_path, data)
    assert not (tmp_path / "metrics.json").exists()
    # What a kill leaves is usable: the newest complete checkpoint loads (checkpoint/ or checkpoint.old/).
    existing = ckpt.existing_dir(tmp_path / "checkpoint")
    assert existing is not None
    ckpt.load_checkpoint(existing)
    if point == "mid-checkpoint-write":
        assert (tmp_path / "checkpoint.tmp" / ckpt.TRAINABLE).is_file()   # the half-written one is aside
        assert json.loads((existing / ckpt.STATE).read_text())["global_step"] == 4
    if point == "between-checkpoint-renames":
        assert existing.name == "checkpoint.old" and not (tmp_path / "checkpoint").exists()

    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    assert_same_run(final_state(tmp_path), uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))) == []
    assert leftovers(tmp_path) == []


def test_second_concurrent_process_is_refused_while_the_first_trains(data, tmp_path):
    first = start_driver("hold", 1, tmp_path, data, SETTINGS)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "holding").is_file():
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run never reached its evaluation"
            time.sleep(0.05)
        with pytest.raises(UserError, match=rf"{tmp_path} is in use by another run \(pid {first.pid}\)"):
            train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
        assert first.poll() is None  # the refused run touched nothing of the first's
    finally:
        first.kill()
        first.wait()
    # Once the holder is gone, the directory is usable again and the run resumes to the usual end.
    (tmp_path / "holding").unlink()
    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)


# ---------------------------------------------------------------- full disk, read-only directory

def _failing_replace(monkeypatch, target: Path, err: int):
    """os.replace onto `target` fails with `err` (what a full or read-only file system does)."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst) == target:
            raise OSError(err, os.strerror(err))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replace)


def test_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(data, uninterrupted, tmp_path, monkeypatch):
    real_save_file = ckpt.save_file
    calls = []

    def save_file(tensors, filename, *a, **k):
        # save_file writes io.atomic_path's temporary file beside checkpoint.tmp/trainable.safetensors
        if Path(filename).parent.name == "checkpoint.tmp" and ckpt.TRAINABLE in Path(filename).name:
            calls.append(filename)
        if len(calls) == 3:  # the 3rd checkpoint (step 6)
            with open(filename, "wb") as f:
                f.write(b"\0" * 10)  # the disk fills up part-way through
            calls.append("failed")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_file(tensors, filename, *a, **k)
    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(UserError) as e:
        train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    message = str(e.value)
    assert "No space left on device" in message and str(tmp_path / "checkpoint") in message
    assert len(message.splitlines()) == 1
    state = ckpt.load_checkpoint(tmp_path / "checkpoint")["state"]
    assert state["global_step"] == 4
    assert not (tmp_path / "checkpoint.tmp").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "metrics.json").exists()

    monkeypatch.undo()  # space freed: the run resumes and ends as if nothing happened
    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    assert_same_run(final_state(tmp_path), uninterrupted)


@pytest.mark.parametrize("name", ["predictions_val.jsonl", "metrics.json"])
def test_read_only_at_the_end_is_one_clear_error_and_resumable(name, data, uninterrupted, tmp_path, monkeypatch):
    _failing_replace(monkeypatch, tmp_path / name, errno.EROFS)
    with pytest.raises(UserError) as e:
        train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    assert str(e.value) == f"cannot write {tmp_path / name}: Read-only file system"
    assert not (tmp_path / name).exists() and not (tmp_path / "metrics.json").exists()
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    assert_same_run(final_state(tmp_path), uninterrupted)


def test_full_disk_while_logging_is_one_clear_error_and_resumable(data, uninterrupted, tmp_path, monkeypatch):
    import csv
    from instructblip_peft import train as train_module

    class FullDiskWriter:
        def __init__(self, f):
            self.rows = 0

        def writerow(self, row):
            self.rows += 1
            if self.rows == 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_module, "csv", type("csv", (), {"writer": FullDiskWriter,
                                                             "DictReader": csv.DictReader}))
    with pytest.raises(UserError) as e:
        train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    assert str(e.value) == f"cannot write {tmp_path / 'train_log.csv'}: No space left on device"
    monkeypatch.undo()
    train("scienceqa", EXPERIMENT, tmp_path, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    state = final_state(tmp_path)
    del state["log"]  # the rows the full disk swallowed are not written again (the log is trimmed, not replayed)
    assert_same_run(dict(state, log=None), dict(uninterrupted, log=None))


# ---------------------------------------------------------------- determinism

def test_same_seed_same_run_other_seed_other_run(data, tmp_path):
    settings = dict(FAST, epochs=1, learning_rate=1e-2)

    def scores(name, **extra):
        train("scienceqa", EXPERIMENT, tmp_path / name, dataset_dir=data, preset="tiny", progress=False,
              **settings, **extra)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        rows = [json.loads(line) for line in (tmp_path / name / "predictions_test.jsonl").read_text().splitlines()]
        weights = load_file(tmp_path / name / "trained_tensors.safetensors")
        return metrics["history"], [r["scores"] for r in rows], weights

    a, b, c = scores("a"), scores("b"), scores("c", seed=7)
    assert a[:2] == b[:2] and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert a[1] != c[1]
    assert not all(torch.equal(a[2][k], c[2][k]) for k in a[2])


# ---------------------------------------------------------------- a sweep killed mid-way

def _lock_released(run_dir: Path, timeout: float = 30) -> bool:
    """The killed CLI's notebook kernel notices its parent is gone within about a second and exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with RunLock(run_dir):
                return True
        except UserError:
            time.sleep(0.2)
    return False


def test_sweep_killed_mid_way_resumes_without_touching_finished_runs(data, tmp_path):
    outputs = tmp_path / "outputs"
    argv = ["sweep", "scienceqa", "27,31,11", "--preset", "tiny", "--outputs", str(outputs), "--processed",
            str(data.parent), "-p", "epochs", "1", "-p", "max_train_samples", "16", "-p", "batch_size", "4",
            "-p", "max_eval_samples", "8", "-p", "checkpoint_every_steps", "1"]
    sweep = subprocess.Popen([sys.executable, "-m", "instructblip_peft", *argv], env=ENV, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second = outputs / "scienceqa" / "31"
    try:
        deadline = time.monotonic() + 180
        while not (second / "checkpoint" / ckpt.STATE).is_file():
            assert sweep.poll() is None, sweep.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the second experiment never wrote a checkpoint"
            time.sleep(0.02)
        # Everything dies at once, as when a Colab runtime disconnects: the notebook kernel (it runs in a
        # session of its own and holds the run's lock) and the CLI.
        kernel = int((second / LOCK).read_text())
        os.kill(kernel, signal.SIGKILL)
        os.killpg(sweep.pid, signal.SIGKILL)
    finally:
        sweep.kill()
        sweep.wait()
    first = outputs / "scienceqa" / "27"
    assert json.loads((first / "metrics.json").read_text())["status"] == "finished"
    assert not (second / "metrics.json").exists() and not (outputs / "scienceqa" / "11").exists()
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    assert _lock_released(second)

    assert cli.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps      # finished run untouched
    executed = (second / "02_train.ipynb").read_text()
    assert "resuming" in executed                                              # the partial one resumed
    for exp_id in ("31", "11"):
        assert json.loads((outputs / "scienceqa" / exp_id / "metrics.json").read_text())["status"] == "finished"
    from instructblip_peft.analysis import collect_runs
    runs = collect_runs(outputs)
    assert sorted(runs["experiment"]) == ["11", "27", "31"] and set(runs["status"]) == {"finished"}
    assert not runs.duplicated(["dataset", "experiment"]).any()


# ---------------------------------------------------------------- bad input through the CLI: one line, nothing written

def _broken_params(t):
    params = t.root / "params"
    shutil.copytree(TESTS_DIR.parent / "params", params)
    (params / "train.yaml").write_text((params / "train.yaml").read_text() + "\nbroken: [unclosed\n")
    return {"INSTRUCTBLIP_PEFT_PARAMS": str(params)}


def _bad_scienceqa_raw(t):
    raw = scienceqa_raw(t.root / "raw")
    edit_problems(raw, lambda p: p["4"].update(answer=7))
    t.raw = raw


def _damaged_checkpoint(t):
    run = t.outputs / "scienceqa" / EXPERIMENT
    train("scienceqa", EXPERIMENT, run, dataset_dir=t.data, preset="tiny", progress=False, **TINY_RUN)
    (run / "metrics.json").unlink()  # as if killed before the end
    damaged = run / "checkpoint" / ckpt.TRAINABLE
    damaged.write_bytes(damaged.read_bytes()[:100])
    t.keep = {damaged: damaged.read_bytes()}


TINY_RUN = dict(FAST, epochs=1, max_steps=2)
TINY_CLI = ["--preset", "tiny", *[a for k, v in TINY_RUN.items() for a in ("-p", k, str(v))]]

# name: (argv (with {outputs} {processed} {raw} {tmp} filled in), words the one line must contain, set-up)
BAD_INPUT = {
    "unknown dataset": (["run", "nope", "27"], ["unknown dataset 'nope'", "scienceqa"], None),
    "unknown experiment ID": (["run", "scienceqa", "99"], ["unknown experiment ID '99'", "1-64"], None),
    "bad ID range": (["sweep", "scienceqa", "5-2"], ["bad experiment ID range '5-2'", "start is after end"], None),
    "empty ID in a list": (["sweep", "scienceqa", "1,,2"], ["bad experiment ID list '1,,2'", "empty item"], None),
    "unknown preset": (["run", "scienceqa", "27", "--preset", "nope"], ["unknown preset 'nope'", "tiny-t5"], None),
    "preset of the other family": (["run", "scienceqa", "40", "--preset", "tiny-t5"],
                                   ["preset 'tiny-t5' is a t5 model"], None),
    "unknown preset in params": (["params", "28", "--preset", "nope"], ["unknown preset 'nope'"], None),
    "unknown setting": (["run", "scienceqa", "27", "-p", "learning_rat", "1e-4"],
                        ["unknown setting 'learning_rat'", "learning_rate"], None),
    "wrong value type": (["run", "scienceqa", "27", "-p", "epochs", "two"], ["setting 'epochs' must be int", "'two'"],
                         None),
    "negative value": (["run", "scienceqa", "27", "-p", "learning_rate", "-1"],
                       ["setting 'learning_rate' must be positive"], None),
    "value not among the choices": (["run", "scienceqa", "27", "-p", "mixed_precision", "fp8"],
                                    ["setting 'mixed_precision' must be one of", "bf16"], None),
    "half weights without their autocast": (["run", "scienceqa", "27", "-p", "mixed_precision", "no", "-p",
                                              "model_dtype", "bfloat16"],
                                             ["setting 'model_dtype' bfloat16 needs mixed_precision bf16", "'no'"],
                                             None),
    "bad number of loader workers": (["run", "scienceqa", "27", "-p", "num_workers", "some"],
                                     ["setting 'num_workers' must be 'auto' or an integer >= 0"], None),
    "bad shard": (["sweep", "scienceqa", "1-4", "--shard", "5/4"], ["bad --shard '5/4'"], None),
    "training setting to preprocess": (["preprocess", "scienceqa", "-p", "epochs", "3"],
                                       ["preprocess takes only keep_text_only, skip_invalid"], None),
    "raw directory missing": (["preprocess", "scienceqa", "--raw", "{tmp}/missing"],
                              ["raw data directory", "missing not found"], None),
    "custom data without --raw": (["preprocess", "custom"], ["custom data has no bundled sample", "--raw DIR"], None),
    "hub source for iconqa": (["preprocess", "iconqa", "--raw", "hub:someone/IconQA"],
                              ["hub datasets are supported for scienceqa only"], None),
    "malformed raw data": (["preprocess", "scienceqa", "--raw", "{raw}"],
                           ["01_preprocess.ipynb failed", "problems.json", "'4'", "answer index 7 out of range"],
                           _bad_scienceqa_raw),
    "no processed data": (["run", "iconqa", "27"], ["no processed iconqa data", "instructblip-peft preprocess iconqa"],
                          None),
    "params file not valid YAML": (["run", "scienceqa", "27"], ["train.yaml: not valid YAML"], _broken_params),
    "nothing to analyze": (["analyze"], ["no runs to analyze in", "instructblip-peft run"], None),
    "outputs is a file": (["run", "scienceqa", "27", *TINY_CLI, "--outputs", "{tmp}/file"],
                          ["cannot write the executed notebook", "02_train.ipynb"],
                          lambda t: (t.root / "file").write_text("")),
    "damaged checkpoint": (["run", "scienceqa", EXPERIMENT, *TINY_CLI],
                           ["02_train.ipynb failed", "checkpoint/trainable.safetensors: cannot read tensors",
                            "checkpoint in", "is damaged", "--force"], _damaged_checkpoint),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, data, tmp_path, monkeypatch, capsys):
    argv, words, set_up = BAD_INPUT[case]
    t = type("Paths", (), {})()
    t.root, t.data, t.outputs, t.processed, t.raw = tmp_path, data, tmp_path / "outputs", tmp_path / "processed", ""
    t.keep = {}
    if case != "no processed data":
        # A real processed dataset, copied: a mistake must not write beside it.
        shutil.copytree(data, t.processed / "scienceqa")
    env = set_up(t) if set_up else None
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    before = sorted(p for p in t.processed.rglob("*")) if t.processed.exists() else []
    outputs_before = sorted(p for p in t.outputs.rglob("*")) if t.outputs.exists() else []
    argv = [a.format(outputs=t.outputs, processed=t.processed, raw=t.raw, tmp=tmp_path) for a in argv]
    command = argv[0]
    where = {"run": ["--processed", str(t.processed)], "sweep": ["--processed", str(t.processed)],
             "preprocess": ["--processed", str(t.processed)], "analyze": [], "params": []}[command]
    if command in ("run", "sweep", "analyze") and "--outputs" not in argv:
        where = where + ["--outputs", str(t.outputs)]
    capsys.readouterr()

    assert cli.main(argv + where) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and all(w in err for w in words), err
    assert out == ""
    # Nothing written: no processed files beside the data, no run directories; only the executed notebook of a
    # notebook that started is kept, as the record of what failed.
    records = {"01_preprocess.ipynb", "02_train.ipynb"}
    after = sorted(p for p in t.processed.rglob("*")) if t.processed.exists() else []
    assert [p for p in after if p not in before and p.name not in records and p.is_file()] == []
    outputs_after = sorted(p for p in t.outputs.rglob("*")) if t.outputs.exists() else []
    new_outputs = [p for p in outputs_after if p not in outputs_before and p.is_file()]
    assert [p for p in new_outputs if p.name not in records] == []
    assert list(tmp_path.rglob("*.tmp")) == []
    for path, content in t.keep.items():
        assert path.read_bytes() == content


def test_cli_error_reaches_the_terminal_as_one_line_without_warnings(tmp_path):
    result = subprocess.run([sys.executable, "-m", "instructblip_peft", "run", "scienceqa", "27", "-p", "epochs",
                             "two"], env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: setting 'epochs' must be int, got 'two'\n"


def test_real_model_without_network_is_one_clear_error(tmp_path):
    script = ("from instructblip_peft.model import load_model, load_preset\n"
              "from instructblip_peft.errors import UserError\n"
              "try:\n    load_model(load_preset('flant5xl'))\nexcept UserError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    message = result.stdout.strip()
    assert result.returncode == 0 and len(message.splitlines()) == 1, result.stderr[-2000:]
    assert "cannot load model 'Salesforce/instructblip-flan-t5-xl'" in message
    assert "network" in message and "params/presets.yaml" in message

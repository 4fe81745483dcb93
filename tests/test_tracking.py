"""What a run shows while it trains, without a model: the progress line train() writes and the runner shows
(in a terminal: one line rewritten in place; elsewhere one line per epoch), and trackers that are missing."""
import io

import pytest

from instructblip_peft import config, tracking
from instructblip_peft.errors import UserError


class Terminal(io.StringIO):
    def isatty(self):
        return True


def feed(stream, write):
    """Run `write(progress, shown)` against a TrainingProgress while a ProgressTail shows it on `stream`;
    `shown()` makes the tail show what was written so far (its own thread would, within poll_s)."""
    with tracking.ProgressTail(stream, poll_s=60) as tail:
        progress = tracking.TrainingProgress("scienceqa 15", min_interval_s=0)
        write(progress, tail._drain)
        progress.close()
    return stream.getvalue()


def two_epochs(progress, shown=lambda: None):
    progress.started(0, 2, 0)
    progress.total_steps = 4
    for step in (1, 2):
        progress.loss, progress.samples_per_s = 1.5 / step, 12.5
        progress.step(0, 2, step)
        shown()
    progress.status("epoch 1/2, step 2/4, evaluating val")
    shown()
    progress.epoch_done(0, 2, 2, 1.0, 0.5, 0.5, 1)
    progress.step(1, 2, 3)
    progress.epoch_done(1, 2, 4, 0.5, 0.75, 0.75, 2)
    progress.finished("val accuracy 0.7500, test accuracy 0.7000")


def test_elsewhere_one_line_per_epoch():
    lines = feed(io.StringIO(), two_epochs).splitlines()
    assert lines[0] == "scienceqa 15: training 2 epochs"
    assert lines[1].startswith("scienceqa 15: epoch 1/2, step 2/4, loss 1.0000, val accuracy 0.5000 (best 0.5000, "
                               "epoch 1), 12.5 samples/s, ETA ")
    assert lines[2].startswith("scienceqa 15: epoch 2/2, step 4/4, loss 0.5000, val accuracy 0.7500")
    assert lines[3] == "scienceqa 15: val accuracy 0.7500, test accuracy 0.7000"
    assert len(lines) == 4 and "\r" not in "".join(lines)


def test_in_a_terminal_the_step_line_is_rewritten_in_place():
    shown = feed(Terminal(), two_epochs)
    assert "\r\x1b[Kscienceqa 15: epoch 1/2, step 1/4, loss 1.5000, 12.5 samples/s, ETA " in shown
    assert "\r\x1b[Kscienceqa 15: epoch 1/2, step 2/4, loss 0.7500, 12.5 samples/s, ETA " in shown
    assert "\r\x1b[Kscienceqa 15: epoch 1/2, step 2/4, evaluating val\r\x1b[Kscienceqa 15: epoch 1/2, step 2/4, " \
           "loss 1.0000, val accuracy 0.5000" in shown
    lasting = [line.rsplit("\r\x1b[K", 1)[-1] for line in shown.split("\n")[:-1]]
    assert len(lasting) == 4 and lasting[-1] == "scienceqa 15: val accuracy 0.7500, test accuracy 0.7000"
    assert shown.endswith("\n")    # nothing passing is left on the terminal line


def test_without_the_runner_progress_writes_nothing(monkeypatch):
    monkeypatch.delenv(tracking.PROGRESS_ENV, raising=False)
    progress = tracking.TrainingProgress("scienceqa 15")
    two_epochs(progress)  # no file, no error
    assert progress.file is None


def test_a_tracker_that_is_not_installed_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"'report_to' is 'wandb', but the wandb package is not installed: "
                                        r"pip install wandb \(or -p report_to none\)"):
        tracking.check_tracker("wandb")
    tracking.check_tracker("none")


def test_report_to_is_one_of_the_trackers():
    assert config.default_settings()["report_to"] == "tensorboard"
    with pytest.raises(UserError, match="setting 'report_to' must be one of"):
        config.validate_overrides({"report_to": "comet"})

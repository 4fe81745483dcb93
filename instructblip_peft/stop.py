"""Stopping a launched training cleanly, so that a preempted or timed-out sweep task loses nothing.

A sweep task (launch.py) names the signals in the environment (STOP_SIGNALS_ENV), which the notebook kernels
it starts inherit. While train() runs in such a process, one of those signals makes it write a checkpoint at
the next optimizer step (or keep the one just written at an epoch's end) and end the process with
STOPPED_EXIT_STATUS; running the same experiment again resumes from that checkpoint. Elsewhere (a notebook,
`instructblip-peft run`, a script) the variable is unset and train() leaves signal handling alone.

Light on purpose (no torch): the sweep launcher imports the names below.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS_ENV = "INSTRUCTBLIP_PEFT_STOP_SIGNALS"  # e.g. "SIGUSR2,SIGTERM"
STOPPED_EXIT_STATUS = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; running again resumes


def signal_names(signals) -> str:
    return ",".join(signal.Signals(s).name for s in signals)


def parse_signals(text: str) -> list[signal.Signals]:
    return [signal.Signals[name.strip()] for name in text.split(",") if name.strip()]


class StopRequest:
    """Catches the stop signals while in use (`with StopRequest.from_environment() as stop:`); `stop.signum`
    is the first one received, None until then. Python runs the handler between two bytecodes of the main
    thread: the training loop looks at `requested` at its step boundaries."""

    def __init__(self, signals=()):
        self.signals = list(signals)
        self.signum: int | None = None
        self._previous: dict = {}

    @classmethod
    def from_environment(cls, enabled: bool = True) -> "StopRequest":
        """The signals the launcher asked for; none when it did not, or when `enabled` is False (several
        processes of one run would each stop at a different step: only a single process stops cleanly)."""
        text = os.environ.get(STOP_SIGNALS_ENV, "") if enabled else ""
        return cls(parse_signals(text))

    @property
    def active(self) -> bool:
        return bool(self._previous)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        return False

    @staticmethod
    def exit_process(message: str) -> None:
        """End this process now with STOPPED_EXIT_STATUS: the task that started it is waiting for that (a
        notebook kernel would otherwise stay alive after the cell's error). The message goes to the
        process's own stderr, the task's log."""
        stream = sys.__stderr__ or sys.stderr
        try:
            stream.write(message.rstrip() + "\n")
            stream.flush()
        finally:
            os._exit(STOPPED_EXIT_STATUS)

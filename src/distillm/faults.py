"""Stopping cleanly when a cluster asks: SIGTERM (SLURM, Kubernetes preemption) and SIGINT (Ctrl-C).

A training loop holds a ``GracefulStop`` for its whole run and asks ``stop.agreed(all_reduce)`` at every
optimizer-step boundary. The first signal only sets a flag, so the step in flight finishes; at the boundary
every process learns whether any process was signalled (one all-reduce of a flag), so all of them stop at
the same step, write the checkpoint together and raise ``TrainingStopped``. The CLI turns that into one log
line with the command that resumes and exit code ``EXIT_STOPPED``. A second signal exits at once.

The pieces are loop-agnostic: a second loop (MiniLLM's rollouts and PPO epochs) installs the same
``GracefulStop``, asks ``agreed`` at its own step boundary and raises the same ``TrainingStopped``.
Exit codes and what the user sees are in docs/faults.md.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after saving; rerun the same command to resume
# A second signal within this many seconds of the first is the same request delivered twice (SLURM signals
# every process of a job, and torchrun then forwards the signal it received to its workers).
SAME_REQUEST_S = 1.0


class TrainingStopped(Exception):
    """Training stopped at a step boundary on request, after writing a resumable checkpoint."""

    exit_code = EXIT_STOPPED

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"stopped by {signal_name} after optimizer step {step}{where}")


class GracefulStop:
    """Turns the first SIGTERM or SIGINT into a request to stop at the next step boundary.

    Use as a context manager around the loop; it restores the previous handlers on exit. A second signal
    (more than ``SAME_REQUEST_S`` after the first) restores the default action and re-sends itself, so the
    process dies at once as if no handler were installed (exit status 128 + signal: 130, 143).
    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self._at = signum, time.monotonic()
            logger.warning(
                "received %s: stopping after the optimizer step in flight and saving a checkpoint "
                "(a second signal stops at once, losing the steps since the last checkpoint)",
                signal.Signals(signum).name,
            )
            return
        if time.monotonic() - self._at < SAME_REQUEST_S:
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @property
    def signal_name(self) -> str:
        return (
            signal.Signals(self.received).name if self.received is not None else "a signal on another process"
        )

    def agreed(self, any_process: Callable[[bool], bool] | None = None) -> bool:
        """Whether to stop now; call at a step boundary on every process.

        ``any_process(flag) -> bool`` is True on every process when ``flag`` is True on any (an all-reduce);
        ``None`` for a single process.
        """
        requested = self.received is not None
        return any_process(requested) if any_process is not None else requested


# --------------------------------------------------------------------------------------------------------
# The command that resumes.


def launcher_command() -> list[str] | None:
    """The launcher's command line when this process is a worker of torchrun / accelerate launch (Linux)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    parts = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    return parts or None


def resume_command(argv: Sequence[str]) -> str:
    """The command that resumes the run started by ``distillm <argv>`` (or by its launcher's command).

    It is the same command, minus what would throw the saved state away (``--force``, ``train.resume=false``),
    with ``--resume`` for ``distillm train`` so that it refuses to start over if the checkpoint went missing.
    """
    command = launcher_command()
    if command is None:
        program = Path(sys.argv[0]).name if sys.argv else ""
        prefix = ["distillm"] if program == "distillm" else [sys.executable, "-m", "distillm"]
        command = [*prefix, *argv]
    dropped = {"--force", "train.resume=false", "train.resume=False", "--resume"}
    kept = [part for part in command if part not in dropped]
    program = next((i for i, part in enumerate(kept) if Path(part).name == "distillm"), None)
    if program is not None:
        sub = next((i for i in range(program + 1, len(kept)) if not kept[i].startswith("-")), None)
        if sub is not None and kept[sub] == "train":
            kept.insert(sub + 1, "--resume")
    return shlex.join(kept)

"""The errors that end a run with one line, and how an error becomes that line.

main.py maps each to its exit status: `ConfigError` (bad input, 2), `CheckpointError` and
`NonFiniteError` (a fault while running, 1), `Stopped` (SIGINT 130, SIGTERM 0).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot work; the message names the field and the fix, in one line."""


class CheckpointError(OSError):
    """A checkpoint could not be written or read. The message is one line naming the step,
    the folder, the reason and what to do; the checkpoints before it are intact."""


class NonFiniteError(RuntimeError):
    """training.max_consecutive_nonfinite steps in a row had a non-finite loss or gradient."""


class Stopped(Exception):
    """The run stopped on SIGINT or SIGTERM (or a preemption notice) after writing a
    checkpoint of `step`; the same command resumes. Raised, not returned, so that nothing
    after training (main.py's end-of-training evaluation) runs on a machine going away."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(
            f"stopped by {signal_name} at step {step} after saving a checkpoint; "
            "the same command resumes"
        )
        self.signal_name, self.step = signal_name, step


def first_line(error: BaseException, *, named: bool = False, limit: int | None = None) -> str:
    """An exception as one line: the first line of its message (a KeyError's key without
    quotes, a TensorStore error without the array spec it appends), cut to `limit`
    characters, after its type name when `named`; the type name when the message is empty."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = text.split(" See full TensorStore details")[0].strip().splitlines()
    if not lines:
        return type(error).__name__
    line = lines[0][:limit] if limit else lines[0]
    return f"{type(error).__name__}: {line}" if named else line

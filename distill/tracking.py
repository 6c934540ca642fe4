"""What a run reports as it goes: a CSV tracker for accelerate (one `step,name,value` row per logged scalar,
beside TensorBoard and any other accelerate tracker), and `RunLog`, the plain-text `train.log` whose lines
the main process also prints."""

from __future__ import annotations

import csv
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process
from tqdm.auto import tqdm

__all__ = ["CsvTracker", "RunLog", "writer_thread_errors"]


class CsvTracker(GeneralTracker):
    """Appends to `DIR/metrics.csv`. A resumed run first drops the rows past its checkpoint's step,
    so the file never holds a step twice."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, logging_dir: str | Path, resume_step: int = 0) -> None:
        super().__init__()
        self.path, self.resume_step = Path(logging_dir) / "metrics.csv", resume_step

    @on_main_process
    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = _read_rows(self.path) if self.resume_step and self.path.exists() else []
        kept = [r for r in rows if int(r[0]) <= self.resume_step]
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerows([["step", "name", "value"], *kept])

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        pass  # the resolved recipe is written beside it as recipe.yaml

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerows([[step, name, value] for name, value in values.items()])


def _read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))[1:]


class RunLog:
    """Lines of a run for people: printed (around the progress bar) and appended to `DIR/train.log`, by the
    main process only; the other processes say nothing."""

    def __init__(self, directory: str | Path, enabled: bool) -> None:
        self.path, self.enabled = Path(directory) / "train.log", enabled

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        tqdm.write(text)
        with self.path.open("a") as f:
            f.write(text + "\n")


# The modules whose threads write TensorBoard's event files (tensorboard's own writer, used by torch's, or
# tensorboardX's).
_WRITER_MODULES = ("tensorboard.", "tensorboardX.")


@contextmanager
def writer_thread_errors() -> Iterator[list[BaseException]]:
    """The errors of TensorBoard's writer threads while inside, kept in the list yielded instead of printed.

    TensorBoard writes events on a thread of its own: a failed write (a full disk) ends that thread, which
    Python reports with a traceback, and the writer raises the same error again in the caller's thread at its
    next write or flush (accelerate flushes at every log). That error is the run's one line; the thread's
    traceback would come before it. Errors of any other thread are reported as before."""
    caught: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__module__.startswith(_WRITER_MODULES) and isinstance(args.exc_value, Exception):
            caught.append(args.exc_value)
        else:
            previous(args)

    threading.excepthook = hook
    try:
        yield caught
    finally:
        threading.excepthook = previous

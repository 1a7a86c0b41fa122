"""What a person sees while a pipeline runs locally: one line when a step starts and one
when it ends (status, duration, its summary), a line per training epoch, and on failure the
step's own error message and the path of its full log. Everything else a step prints goes
to its log file under ``.thaw/``, never to the terminal."""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

EPOCH = re.compile(r"(\w+) epoch (\d+)/(\d+): (.*)$")
SUMMARY = re.compile(r"thaw summary: (.*)$")
ERROR = re.compile(r"^(?:thaw\.errors\.)?(ThawError|[A-Za-z]+Error): (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def highlight(line: str) -> str | None:
    """The console form of a step's log line, or None when it belongs in the log only."""
    if match := EPOCH.search(line):
        stage, epoch, total, numbers = match.groups()
        return f"    {stage} epoch {epoch}/{total}  {numbers}"
    if match := SUMMARY.search(line):
        return f"    {match.group(1)}"
    return None


def error_message(log_text: str) -> str:
    """The step's own error (a ThawError's text first), not the traceback around it."""
    lines = [_ANSI.sub("", line).strip() for line in log_text.splitlines()]
    found = [m for m in map(ERROR.match, lines) if m]
    thaw = [m for m in found if m.group(1) == "ThawError"]
    best = (thaw or found or [None])[-1]
    if best is not None:
        return best.group(2) if best.group(1) == "ThawError" else best.group(0)
    return next((line for line in reversed(lines) if line), "no output")


class StepLog:
    """One step's log file, fed line by line, with the console lines picked out."""

    def __init__(self, path: Path, echo: Callable[[str], None]) -> None:
        self.path = path
        self.echo = echo
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.started = time.monotonic()

    def feed(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()
        if (shown := highlight(line)) is not None:
            self.echo(shown)

    def close(self) -> float:
        self.file.close()
        return time.monotonic() - self.started


class _KfpLocalOutput(io.TextIOBase):
    """Stands in for stdout while kfp.local runs: its task banners become one line per step
    start and end, the step named as ``names`` says (KFP task name -> step name); the
    executor's output goes to that step's log file, ``<step name>.log``."""

    def __init__(self, log_dir: Path, echo: Callable[[str], None],
                 names: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.echo = echo
        self.names = names
        self.step: StepLog | None = None
        self.name = ""
        self.pending = ""
        self.failed: tuple[str, Path] | None = None

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(text)

    def _line(self, line: str) -> None:
        if match := re.search(r"Executing task '([^']+)'", line):
            self.name = self.names.get(match.group(1), match.group(1))
            self.step = StepLog(self.log_dir / f"{self.name}.log", self.echo)
            self.echo(f"▶ {self.name}  (log {self.step.path})")
        elif (match := re.search(r"Task '([^']+)' finished with status (\w+)", line)) and \
                self.step is not None:
            seconds = self.step.close()
            status = "succeeded" if match.group(2) == "SUCCESS" else "FAILED"
            self.echo(f"{'✔' if status == 'succeeded' else '✘'} {self.name} {status} "
                      f"in {seconds:.0f} s")
            if status == "FAILED":
                self.failed = (self.name, self.step.path)
                self.echo(f"    error: {error_message(self.step.path.read_text())}")
            self.step = None
        elif self.step is not None:
            self.step.feed(line)


@contextmanager
def kfp_local_console(log_dir: Path, echo: Callable[[str], None] | None = None,
                      names: Mapping[str, str] | None = None) -> Iterator[_KfpLocalOutput]:
    """Route everything kfp.local prints (it prints all of it to stdout) through the step
    console, naming each step by ``names`` (KFP task name -> step name, e.g. ``train-2`` ->
    ``partial``: :func:`thawctl.kfp_tasks.step_names`); ``.failed`` names the failed step and
    its log afterwards."""
    real = sys.stdout
    output = _KfpLocalOutput(log_dir, echo or (lambda line: print(line, file=real, flush=True)),
                             names or {})
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # kfp.local's own chatter between tasks
    sys.stdout = output
    try:
        yield output
    finally:
        sys.stdout = real
        root.setLevel(level)

"""Progress of long work on stderr, one API for every command:

    with stage("exporting decoder.onnx"):      # timed; stages nest
        step("validating against PyTorch")      # what the innermost stage is doing now

Where it goes is decided once per command (`configure`), not passed down through signatures:
- stderr is a terminal: a live line (spinner, the stage path, its step, elapsed time) and one
  line kept per finished stage;
- otherwise (CI logs, `| tee`): one plain line when a stage starts and one when it ends, with
  seconds -- steps are transient detail and are not written;
- quiet: nothing.

`native_stderr_filtered()` keeps C++ library chatter that writes straight to file descriptor 2
(SentencePiece's `LOG(INFO)`) off the screen while passing on anything else it writes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# glog-style info lines as SentencePiece writes them: `normalizer.cc(51) LOG(INFO) ...`; the QNN SDK's
# notice on loading its HTP backend: ` # LIBNATIVE: No alternate configuration present in libnative_tls.conf ...`
NATIVE_NOISE = re.compile(r"^(\S+\.(cc|cpp|c)\(\d+\) LOG\(INFO\) | # LIBNATIVE: )")


@dataclass
class _Stage:
    name: str
    started: float = field(default_factory=time.perf_counter)
    step: str = ""


class _Lines:
    """Non-terminal stderr: a line per stage start and end, indented by nesting depth."""

    def started(self, stages: list[_Stage]) -> None:
        self._write(f"{'  ' * (len(stages) - 1)}start  {stages[-1].name}")

    def ended(self, stages: list[_Stage], finished: _Stage, seconds: float, ok: bool) -> None:
        word = "done  " if ok else "failed"
        self._write(f"{'  ' * len(stages)}{word} {finished.name} ({seconds:.1f} s)")

    def changed(self, stages: list[_Stage]) -> None:
        pass  # a step is transient: a log keeps only stage boundaries

    def noted(self, stages: list[_Stage], text: str) -> None:
        self._write(f"{'  ' * len(stages)}{text}")

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def _write(line: str) -> None:
        print(line, file=sys.stderr, flush=True)  # looked up per call: tests and Click swap sys.stderr


class _Terminal:
    """A terminal: rich's live display, redrawn four times a second so the elapsed time moves."""

    def __init__(self):
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner

        self._stages: list[_Stage] = []
        self._spinner = Spinner("dots")
        self._live = Live(get_renderable=self._render, console=Console(stderr=True), transient=True,
                          refresh_per_second=4, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def _render(self):
        if not self._stages:
            return ""
        path = " > ".join(s.name for s in self._stages)
        step = f"  [dim]{self._stages[-1].step}[/]" if self._stages[-1].step else ""
        elapsed = int(time.perf_counter() - self._stages[0].started)
        self._spinner.update(text=f"{path}{step}  [cyan]{elapsed // 60}:{elapsed % 60:02d}[/]")
        return self._spinner

    def started(self, stages: list[_Stage]) -> None:
        self._stages = stages

    def changed(self, stages: list[_Stage]) -> None:
        self._stages = stages

    def noted(self, stages: list[_Stage], text: str) -> None:
        self._live.console.print(f"{'  ' * len(stages)}{text}", highlight=False, markup=False)

    def ended(self, stages: list[_Stage], finished: _Stage, seconds: float, ok: bool) -> None:
        self._stages = stages
        mark = "[green]done[/]  " if ok else "[red]failed[/]"
        self._live.console.print(f"{'  ' * len(stages)}{mark} {finished.name} [dim]({seconds:.1f} s)[/]", highlight=False)

    def pause(self) -> None:
        self._live.stop()  # transient: erases the live line, so nothing redraws while fd 2 is elsewhere

    def resume(self) -> None:
        self._live.start()

    def close(self) -> None:
        self._live.stop()


_quiet = False
_stages: list[_Stage] = []
_display = None


def configure(quiet: bool = False) -> None:
    """Choose, for the command about to run, whether stages are shown (stderr decides how)."""
    global _quiet
    _quiet = quiet


def _open_display():
    if _quiet:
        return None
    return _Terminal() if sys.stderr.isatty() else _Lines()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """A timed stage of work; the outermost one opens the display and closes it."""
    global _display
    if not _stages:
        _display = _open_display()
    entry = _Stage(name)
    _stages.append(entry)
    if _display:
        _display.started(list(_stages))
    ok = False
    try:
        yield
        ok = True
    finally:
        _stages.pop()
        if _display:
            _display.ended(list(_stages), entry, time.perf_counter() - entry.started, ok)
            if not _stages:
                _display.close()
                _display = None


def note(text: str) -> None:
    """A line kept in the output, terminal or log, inside the current stage (e.g. a stage reused)."""
    if _display:
        _display.noted(list(_stages), text)


def step(text: str) -> None:
    """Say what the current stage is doing now (shown on a terminal only)."""
    if _stages:
        _stages[-1].step = text
        if _display:
            _display.changed(list(_stages))


@contextmanager
def native_stderr_filtered(stdout: bool = False) -> Iterator[None]:
    """Run a call whose native code writes to file descriptor 2 (and 1 with `stdout`: the QNN SDK
    prints its notice there, into a command's answer) directly; afterwards pass on what it wrote to
    each except `NATIVE_NOISE` lines (kept at DEBUG level, so `--debug` still shows them)."""
    if _display:
        _display.pause()
    streams = [(2, sys.stderr)] + ([(1, sys.stdout)] if stdout else [])
    for _, stream in streams:
        stream.flush()
    saved = [os.dup(fd) for fd, _ in streams]
    try:
        with ExitStack() as stack:
            captured = [stack.enter_context(tempfile.TemporaryFile(mode="w+b")) for _ in streams]
            for (fd, _), file in zip(streams, captured):
                os.dup2(file.fileno(), fd)
            try:
                yield
            finally:
                for (fd, stream), file, original in zip(streams, captured, saved):
                    stream.flush()
                    os.dup2(original, fd)
                    file.seek(0)
                    _forward(file.read().decode(errors="replace"), stream)
    finally:
        for original in saved:
            os.close(original)
        if _display:
            _display.resume()


def _forward(text: str, stream) -> None:
    for line in text.splitlines():
        if NATIVE_NOISE.match(line):
            log.debug("native: %s", line)
        elif line.strip():
            print(line, file=stream)

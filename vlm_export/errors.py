"""User-facing errors: one line naming the problem and the fix; the CLI exits 2 on them."""


class VlmExportError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem if not self.fix else f"{self.problem} -- fix: {self.fix}"
        return " ".join(text.split())  # never more than one line


class MissingExtraError(VlmExportError):
    """An optional dependency is absent; names the extra that provides it."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python module '{module}', which is not installed",
            f"pip install 'vlm-export[{extra}]'",
        )


def require_module(module: str, extra: str, purpose: str):
    """Import an optional heavy dependency lazily, with an actionable error when absent."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra, purpose) from exc


def require_export_extra(purpose: str) -> None:
    """Commands that start from the PyTorch reference (export, build, generate, inspect, diff) on a
    runtime-only install: raises MissingExtraError naming the `export` extra."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise MissingExtraError("torch", "export", purpose)


def is_interruption(exc: BaseException | None) -> bool:
    """Ctrl-C, even when a library caught it and raised something else from it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False

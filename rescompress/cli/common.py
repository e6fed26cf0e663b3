"""What every command shares: option aliases, the output sink, and error -> exit-code handling.

Results go to stdout (rich tables for people, ``--json`` for machines); progress, logs and warnings go to
stderr. A known error becomes one ``Error: ...`` line and exit 1 (the traceback only with
``RESCOMPRESS_DEBUG=1``); a failed check exits 3.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rescompress.errors import CheckFailed, RescompressError, UsageError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CHECK_FAILED = 3

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up runs; the exit code is 143 (128 + 15), not 130."""


def _forced_width() -> int | None:
    """80 columns when $COLUMNS is set below 20: rich would print nothing at 0 (errors included) and only
    blank lines at 1; None leaves the width to rich (the terminal, or $COLUMNS)."""
    try:
        return 80 if int(os.environ.get("COLUMNS", "")) < 20 else None
    except ValueError:
        return None


stdout = Console(soft_wrap=True, emoji=False, width=_forced_width())  # ":b:" in a path or value stays text
stderr = Console(stderr=True, soft_wrap=True, emoji=False, width=_forced_width())
log = logging.getLogger("rescompress")

# ------------------------------------------------------------------------------------ option aliases
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture override (normally inferred from the file), e.g. resnet50."),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow loading an arbitrary pickled object. Pickles can run code: use only on files you trust.",
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help="Preprocessing preset: imagenet, cifar, fashion-mnist (default: the model's)."),
]
def _check_size(value: str | None) -> str | None:
    try:
        parse_size(value)
    except RescompressError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--input-size ")) from None
    return value


InputSizeOpt = Annotated[
    str | None,
    typer.Option("--input-size", help="Input size override: 64 (square) or HxW, e.g. 192x256.", callback=_check_size),
]
ChannelsOpt = Annotated[int | None, typer.Option("--channels", help="Input channels override (1 or 3).")]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Comma-separated per-channel mean override.")]
StdOpt = Annotated[str | None, typer.Option("--std", help="Comma-separated per-channel std override.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use at most N images.", min=1)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per batch.", min=1)]


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} expects comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{option} expects finite numbers, got {text!r}")
    return values


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} expects comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option} expects positive integers, got {text!r}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UsageError(f"{option} lists {', '.join(map(str, repeated))} more than once: {text!r}")
    return values


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``--input-size``: ``"224"`` -> (224, 224), ``"192x256"`` -> (192, 256) (height x width)."""
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        hw = tuple(int(v) for v in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise UsageError(f"--input-size expects a positive size like 224 or 192x256 (HxW), got {text!r}")
    return hw


def resolve_preprocess(
    default, preset: str | None, input_size: str | None, channels: int | None, mean: str | None, std: str | None
):
    """The model's preprocessing, or a named preset, with command-line overrides applied."""
    from rescompress.spec import get_preset

    base = get_preset(preset) if preset else default
    if base is None:
        raise RescompressError("the model does not record its preprocessing; pass --preset")
    means, stds = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    for option, text, values in (("--mean", mean, means), ("--std", std, stds)):
        if values and max(values) > 1.0:  # the 0-255 convention (OpenCV, mmcv): chance accuracy, silently
            scaled = ",".join(f"{v / 255:.4g}" for v in values)
            raise UsageError(f"{option} applies to pixels scaled to [0, 1], so it is at most 1; got {text} "
                             f"(0-255 scale?): pass {option} {scaled}")
    return base.with_overrides(size=parse_size(input_size), channels=channels, mean=means, std=stds)


# ------------------------------------------------------------------------------------ output sink
class Output:
    """One place that writes results: a rich table/lines for people, or one JSON document."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    wrote_json = False  # a JSON document went to stdout in this command (handle_errors adds none then)

    def result(self, data: dict[str, Any], render: Callable[[Console], None] | None = None) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
            sys.stdout.flush()
            Output.wrote_json = True
        elif render is not None:
            render(stdout)
        else:
            stdout.print(key_value_table(data))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def key_value_table(data: dict[str, Any], title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in data.items():
        table.add_row(str(k), _fmt(v))
    return table


def rows_table(rows: Sequence[dict[str, Any]], columns: Iterable[str] | None = None, title: str | None = None) -> Table:
    cols = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    table = Table(title=title)
    for c in cols:
        text = not rows or isinstance(rows[0].get(c), str)
        # A narrow cell folds onto more lines rather than lose its end: a name its distinguishing part, a
        # number its digits ("87…").
        table.add_column(c, justify="left" if text else "right", overflow="fold")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in cols))
    return table


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def info(message: str) -> None:
    """A progress/log line on stderr."""
    stderr.print(message, highlight=False)


def warn(message: str) -> None:
    stderr.print(f"[yellow]Warning:[/yellow] {message}", highlight=False)


def progress(iterable, total: int | None = None, description: str = ""):
    """Wrap an iterable with a progress bar on stderr (hidden when stderr is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not stderr.is_terminal:
        yield from iterable
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)


# ------------------------------------------------------------------------------------ errors
def debug_enabled() -> bool:
    return os.environ.get("RESCOMPRESS_DEBUG", "") not in ("", "0")


def _message(exc: BaseException) -> str:
    """``str(exc)``; for an exception torch's DataLoader re-raised from a worker, whose message is then the
    worker's whole traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), the
    original message (its last line, without the "module.Type: " prefix)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def first_line(exc: BaseException) -> str:
    """The first line of :func:`_message` (empty for an exception without a message)."""
    text = _message(exc).strip()
    return text.splitlines()[0] if text else ""

def handle_errors(func: Callable) -> Callable:
    """Decorator for command functions: known errors -> one line on stderr and the right exit code.

    ``RESCOMPRESS_DEBUG=1`` adds the traceback before that line; the exit code stays the same, so a CI job
    that tells a failed check (3) from an error (1) behaves the same with debugging on. With ``--json``, stdout
    also gets one document, ``{"error": ..., "exit_code": ...}``, unless the command already wrote its own.
    """

    def fail(line: str, code: int, as_json: bool) -> typer.Exit:
        if debug_enabled():
            stderr.print(traceback.format_exc().rstrip(), markup=False, highlight=False)
        stderr.print(line, markup=False, highlight=False)
        if as_json and not Output.wrote_json:
            kind = {EXIT_CHECK_FAILED: "check_failed", EXIT_USAGE: "usage", 130: "interrupted", 143: "interrupted"}
            Output(True).result({"error": line.partition(": ")[2], "kind": kind.get(code, "error"),
                                 "exit_code": code})
        return typer.Exit(code)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        Output.wrote_json = False
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except CheckFailed as exc:  # a measured threshold did not hold: not an error of the tool or its input
            raise fail(f"FAILED: {exc}", EXIT_CHECK_FAILED, as_json) from None
        except UsageError as exc:
            raise fail(f"Error: {exc}", EXIT_USAGE, as_json) from None
        except RescompressError as exc:
            raise fail(f"Error: {_message(exc)}", EXIT_ERROR, as_json) from None
        except KeyboardInterrupt as exc:
            from rescompress.fileio import COMMITTED

            # An interrupt while the results print comes after the outputs landed: say so, since the
            # folder is not "as it was".
            after = f" after writing the outputs to {COMMITTED[-1]}" if COMMITTED else ""
            raise fail(f"Error: interrupted{after}", 143 if isinstance(exc, Terminated) else 130, as_json) from None
        except OSError as exc:  # a path that cannot be read or written: say which, without a traceback
            where = f": {exc.filename}" if exc.filename else ""
            raise fail(f"Error: {exc.strerror or exc}{where}", EXIT_ERROR, as_json) from None
        except Exception as exc:  # an unexpected failure: still one line, traceback on request
            hint = "" if debug_enabled() else " (set RESCOMPRESS_DEBUG=1 for the traceback)"
            raise fail(f"Error: {type(exc).__name__}: {first_line(exc)}{hint}", EXIT_ERROR, as_json) from None

    return wrapper

"""The Typer application: registers one module per command and maps errors to exit codes.

Each command lives in its own module under ``rescompress.cli`` and exposes ``register(app)``. Heavy
libraries (torch, onnxruntime) are imported inside the command functions so ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys

import typer

from rescompress import __version__

# Order here is the order in --help.
_COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "inspect_cmd",
    "doctor",
    "fold",
    "export_cmd",
    "build_engine",
    "evaluate",
    "benchmark",
    "gate",
    "quantize",
    "prune",
)

app = typer.Typer(
    name="rescompress",
    help=(
        "Prune, fold, INT8-quantize and benchmark torchvision-style ResNets for ONNX Runtime and TensorRT.\n\n"
        "Exit codes: 0 ok, 1 error, 2 usage, 3 a check failed (gate, quantize --max-drop), "
        "130/143 interrupted (Ctrl-C/SIGTERM)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rescompress {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details on stderr."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s"
    )


for _name in _COMMAND_MODULES:
    importlib.import_module(f"rescompress.cli.{_name}").register(app)


def _stop_on_sigterm(signum, frame) -> None:
    from rescompress.cli.common import Terminated

    raise Terminated  # the same clean-up as Ctrl-C: temporary files go, outputs stay whole


def main() -> None:
    # CI timeouts and `docker stop` send SIGTERM; without a handler Python dies at once and leaves the
    # temporary file of an output being written.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    app()

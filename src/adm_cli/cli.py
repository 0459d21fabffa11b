"""The `adm` command: a thin layer over the library. Each command parses, calls, prints.

Library errors (``AdmError``) become one line on stderr and a non-zero exit code here, once;
set ADM_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import typer

from .errors import AdmError

app = typer.Typer(
    name="adm",
    help="Fetch, convert and sample OpenAI's ADM (guided diffusion) ImageNet models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> None:
    """Print one error line and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line and an exit code (ADM_DEBUG=1 re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdmError as exc:
            if os.environ.get("ADM_DEBUG"):
                raise
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except OSError as exc:
            if os.environ.get("ADM_DEBUG"):
                raise
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))

    return wrapper


def _register() -> None:
    # Importing a command module registers its commands on `app`.
    from . import cli_sample, cli_weights  # noqa: F401


def main() -> None:
    _register()
    app(prog_name="adm")


if __name__ == "__main__":
    sys.exit(main())

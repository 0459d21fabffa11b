"""The `adm` command: a thin layer over the library. Each command parses, calls, prints.

Library errors (``AdmError``) become one line on stderr and a non-zero exit code here, once;
set ADM_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
from typing import Callable

import typer

from .errors import AdmError, OutputError

try:  # recent typer ships its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # older typer: click itself
    from click import exceptions as click_errors

app = typer.Typer(
    name="adm",
    help="Fetch, convert and sample OpenAI's ADM (guided diffusion) ImageNet models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"adm-cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Fetch, convert and sample OpenAI's ADM (guided diffusion) ImageNet models."""


def fail(message: str, code: int = 1) -> None:
    """Print one error line and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``timeout``, ``kill``, a closed terminal), raised as Ctrl-C is, so that
    the same cleanup runs: a partial download kept for the next run to resume, temporary outputs
    removed. Python's default for these signals ends the process without any of it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


def _interruption(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The error line and exit code of Ctrl-C (130) or a stop signal (128 + its number)."""
    if isinstance(exc, Stopped):
        return f"stopped by {signal.Signals(exc.signum).name}", 128 + exc.signum
    return "interrupted", 130


def _catch_stop_signals() -> None:
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            with contextlib.suppress(ValueError, OSError):  # not the main thread, or no such signal here
                signal.signal(signum, _stop)


def debug() -> bool:
    """ADM_DEBUG, read as ADM_OFFLINE is (environment.TRUE): ADM_DEBUG=0 means off."""
    from .environment import TRUE

    return os.environ.get("ADM_DEBUG", "").strip().lower() in TRUE


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line and an exit code (ADM_DEBUG=1 re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdmError as exc:
            if debug():
                raise
            line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            fail(_cache_hint(line) if isinstance(exc, OutputError) else line, exc.exit_code)
        except KeyboardInterrupt as exc:
            fail(*_interruption(exc))
        except OSError as exc:
            if debug():
                raise
            fail(_cache_hint(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)))

    return wrapper


def _cache_hint(line: str) -> str:
    """A file that cannot be written in the weights cache: say where that folder comes from, for
    a user who never chose it (a full home disk, a read-only home)."""
    try:
        from .cache import cache_root
    except ImportError:  # (a broken install: the line as it is)
        return line
    root = str(cache_root())
    if "ADM_HOME" in line or not re.search(re.escape(root) + r"(?=[/\\\s:),]|$)", line):
        return line
    return f"{line} (the weights cache: set ADM_HOME to put it elsewhere)"


def _register() -> None:
    # Importing a command module registers its commands on `app`.
    from . import cli_sample, cli_weights  # noqa: F401


def main() -> None:
    _catch_stop_signals()
    try:
        _register()  # typer and rich (torch waits for a command that needs it); a Ctrl-C here is one line too
    except KeyboardInterrupt as exc:
        message, code = _interruption(exc)
        typer.echo(f"error: {message}", err=True)
        sys.exit(code)
    command = typer.main.get_command(app)
    try:
        # standalone_mode=False: click's own usage errors come here instead of printing a
        # multi-line boxed panel; typer.Exit (fail(), --help) comes back as the exit code.
        code = command.main(prog_name="adm", standalone_mode=False)
    except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:  # bare `adm`: the help, as before
        if exc.format_message().strip():  # (rich help is printed while the error is made)
            exc.show()
        code = exc.exit_code
    except click_errors.ClickException as exc:  # -n abc, --bogus, an unknown command
        typer.echo(f"error: {exc.format_message().splitlines()[0]}", err=True)
        code = exc.exit_code
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())

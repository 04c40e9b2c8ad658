"""The ``gradloc`` group: global flags (``-q``, ``--debug``) and the error policy of every command.

Errors in the input are printed as one line (``error: ...``) with exit status 1; usage errors exit 2 (click);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from gradloc import __version__
from gradloc.core import folders
from gradloc.core.interrupts import install, raise_if_interrupted, received, watching

logger = logging.getLogger("gradloc")


# Errors that come from what the user gave us (files, values, names) or from the file system: one line,
# exit 1. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


_PROGRAM = False  # run as the program (console script, python -m gradloc), not from a test runner


QUIET_HELP = ("No progress bars, notes or INFO logs on stderr: only the command's output (tables, documents, "
              "file names), warnings and errors.")


def _output_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """``--quiet`` / ``--debug`` given after the command name: same effect as before it."""
    if value:
        ctx.ensure_object(dict)[param.name] = True
        logging.getLogger().setLevel(logging.DEBUG if param.name == "debug" else logging.WARNING)
    return value


class GradlocGroup(click.Group):
    """Runs a command and turns input errors into one line on stderr (traceback only with --debug).

    Every command also accepts ``--quiet``/``-q`` and ``--debug`` after its name."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params += [
            click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, callback=_output_flag,
                         help=QUIET_HELP),
            click.Option(["--debug"], is_flag=True, expose_value=False, callback=_output_flag,
                         help="Show full tracebacks and debug logging."),
        ]
        super().add_command(cmd, name)

    def main(self, args: Any = None, *more: Any, **kwargs: Any) -> Any:
        """As click's. Run as the program (no ``args``: the console script, ``python -m gradloc``), gradloc also
        ends the process itself once the command has unwound, with the command's status: Python's shutdown
        (which resets signal handlers, and exits by SIGINT when a KeyboardInterrupt once crossed C code) can
        then neither change the status nor print a traceback, and a Ctrl-C from then on exits 130 at once."""
        global _PROGRAM
        _PROGRAM = args is None and threading.current_thread() is threading.main_thread()
        if not _PROGRAM:
            return super().main(args, *more, **kwargs)
        install()  # count SIGINTs from the start (gradloc.core.interrupts)
        code = 1
        try:
            try:
                super().main(args, *more, **kwargs)
                code = 0
            except SystemExit as end:
                code = end.code if isinstance(end.code, int) else 0 if end.code is None else 1
            signal.signal(signal.SIGINT, _exit_130)
        except KeyboardInterrupt:  # a Ctrl-C as the command ended
            signal.signal(signal.SIGINT, _exit_130)
            click.echo(FINISHED, err=True)
            code = 130
        _flush()
        os._exit(code)

    def invoke(self, ctx: click.Context) -> Any:
        start, swapped = received(), len(folders.SWAPPED)
        try:
            with watching():
                result = super().invoke(ctx)
                raise_if_interrupted(start)  # a Ctrl-C whose exception was swallowed on the way
            if _PROGRAM:  # done: from here a Ctrl-C exits 130 at once (click would turn it into "Aborted!")
                signal.signal(signal.SIGINT, _exit_130)
            return result
        except BrokenPipeError:
            _quiet_broken_pipe()
            sys.exit(141)  # 128 + SIGPIPE, what a shell pipeline expects from `cmd | head`
        except USER_ERRORS as error:
            if received() > start:  # the error followed a Ctrl-C: report the interruption
                _interrupted(folders.SWAPPED[swapped:])
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {one_line(str(error))}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            _interrupted(folders.SWAPPED[swapped:])
        except MemoryError:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo("error: out of memory; lower --batch-size (or --input-size, --limit) and rerun", err=True)
            sys.exit(1)


MAX_ERROR_CHARS = 1000
"""Longest error line printed: messages quote values through gradloc.core.names.excerpt, and this bounds what
any other message (a library's, an OS error's) can print."""


def one_line(message: str) -> str:
    """``message`` as one line of at most :data:`MAX_ERROR_CHARS` characters (line breaks become spaces)."""
    text = " ".join(message.splitlines())
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:MAX_ERROR_CHARS]}... ({len(text):,} characters)"


def _interrupted(written: list[Any]) -> None:
    """Say what was written and how to resume, and exit 130; a second Ctrl-C exits at once."""
    if _PROGRAM:
        signal.signal(signal.SIGINT, _exit_at_once)
    done = (f"{', '.join(str(path) for path in written)} had been written in whole before it; other folders keep "
            "their previous files" if written else "the run folder keeps its previous results")
    click.echo(f"interrupted: {done} and finished heatmaps stay cached; rerun the same command to resume",
               err=True)
    sys.exit(130)


FINISHED = "interrupted: the command had already finished (what it wrote is complete); exit status 130"


def _exit_130(signum: int, frame: Any) -> None:
    """SIGINT while gradloc is already ending: say so, flush what was printed and exit 130 without unwinding."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(FINISHED + "\n")
    _flush()
    os._exit(130)


def _exit_at_once(signum: int, frame: Any) -> None:
    """A second Ctrl-C while an interrupted command unwinds: exit 130 now (the first one was reported)."""
    _flush()
    os._exit(130)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so that the final flush at exit
    raises nothing either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (click's test runner)
        pass


@click.group(cls=GradlocGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradloc")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logging.")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """gradloc: how well do Grad-CAM-family heatmaps localize objects in Pascal VOC?

    \b
    Example (offline demo, about two minutes on a laptop CPU):
      gradloc demo
    """
    ctx.ensure_object(dict).update(debug=debug, quiet=quiet)
    try:
        os.getcwd()  # before anything imports torch, whose MKL aborts without a working directory
    except FileNotFoundError:
        raise FileNotFoundError("the working directory no longer exists (deleted or unmounted); cd to an "
                                "existing folder and rerun") from None
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")

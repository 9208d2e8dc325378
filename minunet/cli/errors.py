"""One-line errors for the command line.

Every command runs inside ``MinunetGroup``: a ``MinunetError`` (bad data, bad
checkpoint, bad settings), an ``OSError`` (a path the file system refuses) or a
click usage error becomes one line on stderr,

    Error: <what is wrong, which file, what to do>

and exit status 2; nothing prints a traceback for bad input. This is the one
place that maps exceptions to that line. A backend that cannot start (CuPy not
installed, no CUDA device, Numba missing, an unknown name or dtype) reaches it
as a ``ConfigError``: every command opens its backend through
``kernels.open_backend``, which raises nothing else. Errors that mean "the code is wrong" keep their traceback.

A ``MinunetWarning`` (the work goes on, but the user should know: e.g. a cache
folder that cannot be written) is shown the same way, as ``warning: <message>``.
"""

from __future__ import annotations

import sys
import warnings

import click

from minunet.errors import MinunetError, MinunetWarning

EXIT_BAD_INPUT = 2


class CliError(click.ClickException):
    """Raise from a command for bad input: one line, exit status 2."""

    exit_code = EXIT_BAD_INPUT


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _one_line_warnings(show_other):
    """A ``warnings.showwarning`` hook: MinunetWarning as one line, any other warning as ``show_other`` shows it."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MinunetWarning):
            click.echo(f"warning: {_one_line(message)}", err=True)
        else:
            show_other(message, category, filename, lineno, file, line)

    return show


class MinunetGroup(click.Group):
    """A click group whose errors are one line and exit 2 (usage errors included)."""

    def parse_args(self, ctx, args):
        # ``minunet`` alone asks what there is: the help, exit 0 (click >= 8.2 makes it a usage error).
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            click.echo(ctx.get_help(), color=ctx.color)
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MinunetError as e:
            raise CliError(str(e)) from None
        except OSError as e:
            # The file system said no (a file where a folder is wanted, no permission, a full disk): the
            # user's to fix, so one line naming the path (of a rename, the destination).
            path = e.filename2 or e.filename
            raise CliError(f"{e.strerror or e}{f': {path}' if path else ''}: check the path, its permissions "
                           "and the free disk space") from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            with warnings.catch_warnings():  # restores the showwarning hook when the command ends
                warnings.showwarning = _one_line_warnings(warnings.showwarning)
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except click.ClickException as e:
            msg = _one_line(e.format_message())
            if isinstance(e, click.UsageError) and e.ctx is not None:
                msg += f" (see '{e.ctx.command_path} --help')"
            click.echo(f"Error: {msg}", err=True)
            sys.exit(EXIT_BAD_INPUT if isinstance(e, click.UsageError) else e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

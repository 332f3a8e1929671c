"""The ``cfrh`` command line. Each stage's commands live in their own module here and
register themselves on :data:`cli`; ``main`` turns user-fixable errors into one line."""
from __future__ import annotations

import importlib
import pkgutil
import sys

import click
from rich.markup import escape

from ..errors import CfrhError
from .common import cli, err_console, say

__all__ = ["cli", "main"]

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "common":
        importlib.import_module(f"{__name__}.{_mod.name}")


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        say("aborted", "red")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except CfrhError as e:
        err_console.print("[bold red]error:[/bold red] " + escape(str(e)), highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        say("interrupted; rerun the same command to resume", "yellow")
        sys.exit(130)

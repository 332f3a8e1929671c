"""The ``cfrh`` command line. Each stage's commands live in their own module here and
register themselves on :data:`cli`; ``main`` turns user-fixable errors into one line."""
from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from ..errors import CfrhError
from .common import cli, console

__all__ = ["cli", "main"]

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "common":
        importlib.import_module(f"{__name__}.{_mod.name}")


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        console.print("[red]aborted[/red]")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except CfrhError as e:
        console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; rerun the same command to resume[/yellow]")
        sys.exit(130)

"""What every command shares: the click group, the console, and the pipeline/cache options."""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from ..config import Pipeline, load_pipeline

# Piped output (CI logs, `| tee`) gets a wide fixed width instead of rich's 80 columns, so tables stay whole.
console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160)))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cfrh")
def cli() -> None:
    """cfrh: unsupervised cross-modal hashing (CFRH) over a shareable CLIP / bag-of-words feature cache.

    Stages: extract (features → cache), train (cache → codes), evaluate (codes → mAP), search.
    """


def pipeline_options(fn: Callable) -> Callable:
    """PIPELINE argument plus --cache and --set, resolved into ``pipeline`` and ``cache_root`` kwargs."""
    @click.argument("pipeline_name", metavar="PIPELINE")
    @click.option("--cache", "cache_root", default=None, envvar="CFRH_CACHE",
                  help="Cache root: a folder or fsspec URL (default ./cache, or $CFRH_CACHE).")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override a pipeline setting, e.g. --set train.epochs=20 (repeatable).")
    @functools.wraps(fn)
    def wrapper(pipeline_name: str, overrides: tuple[str, ...], **kwargs: Any) -> Any:
        return fn(pipeline=load_pipeline(pipeline_name, overrides), **kwargs)
    return wrapper


def progress() -> Progress:
    """The one progress-bar style of the CLI (rich; silent when output is not a terminal)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


__all__ = ["cli", "console", "pipeline_options", "progress", "Pipeline"]

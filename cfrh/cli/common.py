"""What every command shares: the click group, the consoles, and the pipeline / cache / runs options.

Output discipline: results (tables, JSON) go to stdout; progress bars, notes and warnings to stderr, so
``cfrh evaluate --json | python -m json.tool`` sees only JSON. Library modules never import this package,
and it imports no torch or transformers at import time (commands import the stages when they run), so
``cfrh --help`` stays fast.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from ..config import Pipeline, apply_overrides, load_pipeline

# Piped output (CI logs, `| tee`) gets a wide fixed width instead of rich's 80 columns, so tables stay whole.
console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160)))
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else int(os.environ.get("COLUMNS", 160)))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cfrh")
def cli() -> None:
    """cfrh: unsupervised cross-modal hashing (CFRH) over a shareable CLIP / bag-of-words feature cache.

    Stages: extract (features → cache), train (cache → a run: models and codes), evaluate (codes → mAP),
    encode / search. The cache (--cache, $CFRH_CACHE, ./cache) can be shared read-only; each person's runs
    go to --runs ($CFRH_RUNS, ./runs).
    """


def say(message: str, style: str | None = None) -> None:
    """A note or warning for the user, on stderr; the message's own brackets print as written."""
    text = escape(message)
    err_console.print(f"[{style}]{text}[/{style}]" if style else text, highlight=False, soft_wrap=True)


def pipeline_options(fn: Callable) -> Callable:
    """PIPELINE argument plus --cache, --model and --set, resolved into ``pipeline``, ``cache_root`` and
    ``model`` kwargs."""
    @click.argument("pipeline_name", metavar="PIPELINE")
    @click.option("--cache", "cache_root", default=None, envvar="CFRH_CACHE",
                  help="Cache root: a folder or fsspec URL (default ./cache, or $CFRH_CACHE).")
    @click.option("--model", default=None,
                  help="Image model (hub id or checkpoint directory) whose feature cache to use; needed only when "
                       "the cache root holds caches of several models for this pipeline.")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override a pipeline setting, e.g. --set train.epochs=20 (repeatable).")
    @functools.wraps(fn)
    def wrapper(pipeline_name: str, overrides: tuple[str, ...], **kwargs: Any) -> Any:
        return fn(pipeline=load_pipeline(pipeline_name, overrides), **kwargs)
    return wrapper


def runs_option(fn: Callable) -> Callable:
    """--runs: where training runs are written and read (default ./runs, or $CFRH_RUNS)."""
    return click.option("--runs", "runs_root", default=None, envvar="CFRH_RUNS",
                        help="Runs root: a folder or fsspec URL (default ./runs, or $CFRH_RUNS).")(fn)


def with_overrides(pipeline: Pipeline, **settings: Any) -> Pipeline:
    """The pipeline with ``section.key`` settings given by flags (None: not given)."""
    import json

    return apply_overrides(pipeline, [f"{k}={json.dumps(v)}" for k, v in settings.items() if v is not None])


def progress() -> Progress:
    """The one progress-bar style of the CLI (rich, on stderr; off when stderr is not a terminal, so logs and
    pipes get results and messages only)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, transient=False, disable=not err_console.is_terminal)


__all__ = ["cli", "console", "err_console", "say", "pipeline_options", "runs_option", "with_overrides", "progress",
           "Pipeline"]

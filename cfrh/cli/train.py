"""``cfrh train PIPELINE``: train CFRH on a pipeline's cache and write codes for every item."""
from __future__ import annotations

import click
from rich.table import Table

from ..config import Pipeline, apply_overrides
from .common import cli, console, pipeline_options


def _parse_bits(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        bits = [int(b) for b in value.replace(" ", "").split(",") if b]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give code lengths separated by commas, e.g. 16,32,64,128") from None
    if not bits or any(b <= 0 or b % 8 for b in bits):
        raise click.BadParameter(f"{value!r}: code lengths must be positive multiples of 8")
    return bits


@cli.command("train")
@pipeline_options
@click.option("--bits", callback=_parse_bits, default=None, metavar="B1,B2,...",
              help="Code lengths to train, e.g. 16,32,64,128 (default: the pipeline's train.bits).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Shorthand for --set train.epochs=N.")
@click.option("--run", default="cfrh", show_default=True,
              help="Name of the run; codes go to runs/<run>/<bits>/ in the cache.")
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming or keeping finished bit lengths.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(pipeline: Pipeline, cache_root: str | None, bits: list[int] | None, epochs: int | None,
                  run: str, no_resume: bool, quiet: bool) -> None:
    """Train CFRH from the feature cache of PIPELINE and write hash codes for every item.

    Resumes an interrupted run from its last checkpoint; a bit length that already finished with the
    same settings is kept. Settings come from the pipeline's [train] table (see --set).
    """
    from ..training import train

    if epochs is not None:
        pipeline = apply_overrides(pipeline, [f"train.epochs={epochs}"])
    summary = train(pipeline, cache_root=cache_root, bits=bits, run=run, resume=not no_resume, progress=not quiet)
    table = Table(title=f"run {summary['run']} · {summary['train_rows']:,} training pairs"
                        f"{' (streamed)' if summary['streamed'] else ''}")
    for col in ("bits", "epochs", "seconds", "intra", "cross", "recon", "pair", "total", "note"):
        table.add_column(col, justify="left" if col == "note" else "right")
    for b, s in summary["bits"].items():
        loss = s["loss"]
        note = ("kept (already trained)" if s["skipped"]
                else f"resumed after epoch {s['resumed_from_epoch']}" if s["resumed_from_epoch"] else "")
        table.add_row(b, str(s["epochs"]), f"{s['seconds']:.1f}",
                      *(f"{loss[k]:.4f}" if k in loss else "-" for k in ("intra", "cross", "recon", "pair", "total")),
                      note)
    console.print(table)
    console.print(f"codes: {summary['cache']}/runs/{summary['run']}/<bits>/{{image_codes,text_codes}}", highlight=False)

"""``cfrh train PIPELINE``: train CFRH (or a baseline, ``--method``) on a pipeline's cache and write codes for every
item."""
from __future__ import annotations

import click
from rich.table import Table

from ..config import Pipeline
from .common import cli, console, pipeline_options, progress, runs_option, say, with_overrides


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
@click.option("--method", type=click.Choice(["cfrh", "djsrh", "jdsh", "dgcpn"]), default=None,
              help="What to train (default train.method, cfrh): CFRH, or a baseline with its published settings "
                   "(DJSRH: its WIKI settings; JDSH, DGCPN: their MIRFLICKR settings; change one with "
                   "--set train.djsrh.epochs=N).")
@runs_option
@click.option("--run", default=None,
              help="Name of the run (default: the method's name); models and codes go to "
                   "<runs>/<pipeline>/<feature key>/<run>/<bits>/.")
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming or keeping finished bit lengths.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(pipeline: Pipeline, cache_root: str | None, model: str | None, runs_root: str | None,
                  bits: list[int] | None, epochs: int | None, method: str | None, run: str | None, no_resume: bool,
                  quiet: bool) -> None:
    """Train CFRH from the feature cache of PIPELINE and write hash codes for every item into a run.

    Resumes an interrupted run from its last checkpoint; a bit length that already finished with the
    same settings is kept. Settings come from the pipeline's [train] table (see --set). --method trains a
    baseline instead into a run of its own name, so `cfrh evaluate PIPELINE` scores them side by side.
    The cache is only read (it may be shared read-only); the run goes under --runs.
    """
    from ..training import train

    pipeline = with_overrides(pipeline, **{"train.epochs": epochs})
    if quiet:
        summary = train(pipeline, cache_root, bits=bits, run=run, resume=not no_resume, runs_root=runs_root,
                        model=model, method=method)
    else:
        with progress() as bar:
            tasks: dict[str, int] = {}

            def on_progress(name: str, advance: int, total: int, terms: dict | None) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=total, info="")
                info = f"ep {terms['epoch']} " + " ".join(
                    f"{k} {v:.4f}" for k, v in terms.items() if k != "epoch") if terms else None
                bar.update(tasks[name], advance=advance, **({"info": info} if info else {}))

            summary = train(pipeline, cache_root, bits=bits, run=run, resume=not no_resume, runs_root=runs_root,
                            model=model, method=method, on_progress=on_progress)
    table = Table(title=f"run {summary['run']} · {summary['method']} · {summary['train_rows']:,} training pairs"
                        f"{' (streamed)' if summary['streamed'] else ''}")
    # the loss terms of the method (CFRH: intra, cross, recon, pair), total last
    terms = list(dict.fromkeys(k for s in summary["bits"].values() for k in s["loss"]
                               if k not in ("epoch", "alpha", "seconds", "total"))) + ["total"]
    for col in ("bits", "epochs", "seconds", *terms, "note"):
        table.add_column(col, justify="left" if col == "note" else "right")
    for b, s in summary["bits"].items():
        loss = s["loss"]
        note = ("kept (already trained)" if s["skipped"]
                else f"resumed after epoch {s['resumed_from_epoch']}" if s["resumed_from_epoch"] else "")
        table.add_row(b, str(s["epochs"]), f"{s['seconds']:.1f}", *(f"{loss[k]:.4f}" if k in loss else "-" for k in terms),
                      note)
    console.print(table)
    say(f"run: {summary['runs']} (codes in <bits>/image_codes.npy, text_codes.npy)")

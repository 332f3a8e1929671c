"""``cfrh evaluate PIPELINE``: the mAP table of the training runs (every method side by side), with a report and
plots in the first run."""
from __future__ import annotations

import json

import click
from rich.table import Table

from ..config import Pipeline
from .common import cli, console, pipeline_options, progress, runs_option, say


def _int_list(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[int] | None:
    """``--bits 16 --bits 32`` or ``--bits 16,32``."""
    try:
        out = [int(v) for text in values for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{', '.join(values)}: give whole numbers, e.g. 16,32 or repeat the option")
    if any(v <= 0 for v in out):
        raise click.BadParameter("values must be positive")
    return out or None


@cli.command()
@pipeline_options
@runs_option
@click.option("--run", "runs", multiple=True, metavar="NAME",
              help="A training run to evaluate (repeatable; default: every run of the pipeline's cache, one per "
                   "method trained, cfrh first). The report goes into the first.")
@click.option("--bits", multiple=True, callback=_int_list, metavar="N[,N...]",
              help="Bit lengths to evaluate (default: every complete one of the run).")
@click.option("--topk", multiple=True, callback=_int_list, metavar="K[,K...]",
              help="K of mAP@K (default: evaluate.map_k of the pipeline, 50).")
@click.option("--baseline", type=click.Choice(["random-projection", "none"]), default=None,
              help="Score a baseline on the same splits (default: evaluate.baseline, random-projection).")
@click.option("--direction", "directions", multiple=True, type=click.Choice(["i2t", "t2i", "i2i", "t2t"]),
              help="Directions to score (default: all four).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def evaluate(pipeline: Pipeline, cache_root: str | None, model: str | None, runs_root: str | None,
             runs: tuple[str, ...],
             bits: list[int] | None, topk: list[int] | None, baseline: str | None, directions: tuple[str, ...],
             as_json: bool) -> None:
    """Score the runs' codes on the pipeline's protocol: mAP@all, mAP@K, P@K (stable tie rule and tie-aware),
    PR curves and top-N precision, for image→text, text→image, image→image and text→text.

    Without --run, every run of the pipeline's cache is scored side by side, labelled with its method (runs
    trained on another cache or split are left out with a note). Writes report.json, report.md and PNG plots
    to the first run's report/ folder (under --runs)."""
    from ..evaluation import evaluate as run_evaluate, table_columns, table_rows

    with progress() as bar:
        task = bar.add_task("loading codes", total=None, info="")

        def on_batch(name: str, done: int, total: int) -> None:  # one line: the direction being scored
            bar.update(task, description=name, completed=done, total=total)

        report = run_evaluate(pipeline, cache_root, run=list(runs) or None, bits=bits, map_k=topk, baseline=baseline,
                              directions=list(directions) or None, on_batch=on_batch, runs_root=runs_root,
                              model=model)
        bar.update(task, description="scored")
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "curves"}, indent=1))
        return
    p = report["protocol"]
    trained = [r["label"] for r in report["runs"]]
    table = Table(title=f"{report['pipeline']} · run{'s' if len(trained) > 1 else ''} {', '.join(trained)} · "
                        f"{p['n_query']:,} queries × {p['n_database']:,} database items")
    for title in ("method", "bits", "direction"):
        table.add_column(title, no_wrap=True)
    for _, title in table_columns(report):
        table.add_column(title, justify="right")
    previous = None
    for row in table_rows(report):
        if previous is not None and row[:2] != previous:
            table.add_section()
        table.add_row(*row, style="dim" if row[0] not in trained else None)
        previous = row[:2]
    console.print(table)
    chance = report["chance"]
    console.print("chance level (random ranking): "
                  + ", ".join(f"{title} {chance[k]:.4f}" for k, title in table_columns(report) if k in chance))
    console.print(f"ties: {report['definitions']['ties']}; mAP@K rule {report['settings']['map_k_rule']}: "
                  f"{report['definitions']['map_k']}", highlight=False, markup=False)
    for note in report["notes"]:
        say(f"note: {note}", "yellow")
    for warning in report.get("warnings", []):
        say(f"WARNING: {warning}", "bold red")
    for name, path in report.get("files", {}).items():
        say(f"wrote {path}")

"""``cfrh demo``: the whole product on a generated collection (or on one of yours, only read) — extract →
train → evaluate → search."""
from __future__ import annotations

import json
from pathlib import Path

import click

from rich.markup import escape

from ..cache import CacheMismatch
from ..locations import cache_root as default_cache_root
from ..config import load_pipeline
from ..demo import DemoModel, choose_model, model_settings, prepare_data
from .common import cli, console
from .evaluate import evaluate as evaluate_command
from .extract import extract as extract_command
from .search import search as search_command
from .train import train_command

PIPELINE = "demo"


def _model_lines(choice: DemoModel) -> str:
    if choice.random_init:
        return ("[bold red]DEMO WITH AN UNTRAINED CLIP[/bold red] — " + choice.reason
                + ". The pipeline runs for real, but image features are random projections of pixels, so the "
                  "retrieval numbers of this run are NOT CFRH's quality. Set CLIP_MODEL to a hub id or a local "
                  "checkpoint directory for real numbers.")
    return f"[bold green]cfrh demo[/bold green] with {choice.reason}"


@cli.command()
@click.option("--model", "clip_model", envvar="CLIP_MODEL", default=None,
              help="CLIP checkpoint: a hub id or a local directory (default openai/clip-vit-base-patch32; "
                   "$CLIP_MODEL). Without one, an untrained ViT-B/32, said so plainly.")
@click.option("--cache", "cache_root", default=None, envvar="CFRH_CACHE",
              help="Cache root: a folder or fsspec URL (default ./cache, or $CFRH_CACHE).")
@click.option("--runs", "runs_root", default=None, envvar="CFRH_RUNS",
              help="Runs root: a folder or fsspec URL (default ./runs, or $CFRH_RUNS).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="A new or empty folder to render the scenes into (default: the demo pipeline's dataset.root, "
                   "cache/demo-data), or a collection to run the demo on, only read: images with a captions "
                   "CSV/JSONL, or the COCO layout.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default: the pipeline's).")
@click.option("--query", "query_text", default="red circle", show_default=True, help="The example text search.")
@click.pass_context
def demo(ctx: click.Context, clip_model: str | None, cache_root: str | None, runs_root: str | None,
         data_dir: str | None,
         epochs: int | None, query_text: str) -> None:
    """Run extract → train → evaluate → search on generated scenes of coloured shapes, or on your collection.

    The scenes (600 images with tags, a caption and shape/colour labels) are rendered into the demo
    pipeline's dataset folder, or into --data DIR when it is new, empty or the demo's own (marked
    .cfrh-demo). A --data folder holding a collection (images with a captions CSV/JSONL, or the COCO
    layout) is only read: its pipeline and cache go under the cache root. Any other folder is refused,
    never written into. Everything else is the product's own stages, as a user would run them.
    """
    pipeline = load_pipeline(PIPELINE)
    local_root = Path(cache_root) if cache_root and "://" not in cache_root else Path(default_cache_root())
    with console.status("choosing the CLIP model"):
        choice = choose_model(clip_model, local_root)
    console.print(_model_lines(choice), soft_wrap=True)

    data_root = Path(data_dir).resolve() if data_dir else pipeline.resolve_path(pipeline.dataset["root"])
    with console.status(f"preparing the demo's data in {data_root}"):
        data = prepare_data(data_root, pipeline, local_root, choice)
    if not data.generated:
        console.print(f"running the demo on the collection in {data_root} (only read; its pipeline: "
                      f"{data.pipeline})", highlight=False, soft_wrap=True)
    console.rule("1/4 extract")
    overrides = data.overrides + tuple(f"features.{k}={json.dumps(v)}" for k, v in model_settings(choice).items())
    common = {"pipeline_name": data.pipeline, "overrides": overrides, "cache_root": cache_root,
              "model": choice.location}
    try:
        ctx.invoke(extract_command, **common)
    except CacheMismatch as e:
        # The demo's caches are its own (its scenes, or a collection under a demo-* name): stale, not precious.
        console.print(f"[yellow]the demo's cache was built from other scenes or settings; re-extracting[/yellow] "
                      f"({escape(str(e))})", highlight=False, soft_wrap=True)
        ctx.invoke(extract_command, **common, overwrite=True)
    console.rule("2/4 train")
    staged = {**common, "runs_root": runs_root}
    from ..estimator import RunMismatch   # here, not at the top: `cfrh --help` loads no torch

    try:
        ctx.invoke(train_command, **staged, epochs=epochs)
    except RunMismatch as e:
        # Its runs are the demo's own too: one made from an older cache or with older settings is retrained.
        console.print(f"[yellow]the demo's run was trained on another cache or with other settings; retraining"
                      f"[/yellow] ({escape(str(e))})", highlight=False, soft_wrap=True)
        ctx.invoke(train_command, **staged, epochs=epochs, no_resume=True)
    console.rule("3/4 evaluate")
    if data.scored:
        ctx.invoke(evaluate_command, **staged)
    else:
        console.print("the collection has no labels, so there is nothing to score; search works without them",
                      highlight=False, soft_wrap=True)
    console.rule(f"4/4 search: text {query_text!r} → images")
    ctx.invoke(search_command, **staged, query_text=query_text, k=5)
    image = data.example
    console.rule(f"4/4 search: image {image.name} → texts")
    ctx.invoke(search_command, **staged, query_image=str(image), k=5)
    console.rule()
    console.print(_model_lines(choice), soft_wrap=True)

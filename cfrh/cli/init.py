"""``cfrh init DIR``: a pipeline file for your own collection, worked out from the folder."""
from __future__ import annotations

from pathlib import Path

import click

from .common import cli, console, say


@cli.command("init")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The pipeline file to write (default ./<folder name>.toml in the working directory).")
@click.option("--model", default=None,
              help="CLIP checkpoint: a hub id or a local directory (default openai/clip-vit-base-patch32 when it "
                   "can be loaded; else an UNTRAINED ViT-B/32, said so in the file).")
@click.option("--force", is_flag=True, help="Replace an existing pipeline file.")
def init_command(folder: str, out: str | None, model: str | None, force: bool) -> None:
    """Write a pipeline for the images and captions in FOLDER: the reader, the image/text/label columns, a
    model that loads here, a split and batch size scaled to the collection. Nothing is written into FOLDER.
    Then: cfrh extract FILE && cfrh train FILE && cfrh evaluate FILE."""
    from ..collection import collection_tables, pipeline_name, pipeline_text
    from ..demo import choose_model, model_settings
    from ..locations import cache_root

    name = pipeline_name(Path(folder))
    path = Path(out or f"{name}.toml")
    if path.exists() and not force:
        raise click.UsageError(f"{path} exists; pass --force to replace it or --out to write another file")
    tables, collection = collection_tables(Path(folder), {})     # the folder first: it is the cheap check
    with console.status("choosing the CLIP model"):
        choice = choose_model(model, Path(cache_root()))
    tables["features"] = model_settings(choice)
    header = (f"cfrh pipeline for {Path(folder).resolve()} (written by `cfrh init`)\n"
              f"image model: {choice.reason}")
    path.write_text(pipeline_text(tables, name, header=header))
    split = tables["split"]
    say(f"{len(collection):,} items ({collection.dropped.counts or 'none dropped'}); reader {tables['dataset']['reader']}"
        + "".join(f", {k} {tables['dataset'][k]!r}" for k in ("image_field", "text_field", "labels_field")
                  if k in tables["dataset"])
        + f"; {split['query']:,} queries, {len(collection) - split['query']:,} training/database items")
    if choice.random_init:
        say(f"WARNING: {choice.reason}; set --model to real CLIP weights for real retrieval quality", "bold red")
    console.print(f"wrote {path}; next: cfrh extract {path} && cfrh train {path} && cfrh evaluate {path}",
                  highlight=False, markup=False)


__all__ = ["init_command"]

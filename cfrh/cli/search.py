"""``cfrh encode PIPELINE`` (new images / texts → codes) and ``cfrh search PIPELINE`` (a query → the
nearest database items of the other modality)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from ..config import Pipeline
from .common import cli, console, pipeline_options, progress, runs_option, say


def _bits(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value <= 0 or value % 8:
        raise click.BadParameter(f"{value}: code lengths are positive multiples of 8 (e.g. 16, 32, 64, 128)")
    return value


RUN_OPTIONS = (
    runs_option,
    click.option("--run", default="cfrh", show_default=True, help="Training run whose model and codes to use."),
    click.option("--bits", type=int, callback=_bits, default=64, show_default=True, help="Code length."),
    click.option("--model-dir", "image_model", default=None,
                 help="CLIP checkpoint (hub id or directory) when the one the cache was extracted with lives "
                      "elsewhere on this machine; it must be the same model (checked against the manifest)."),
    click.option("--device", default="auto", show_default=True, help="Device for the image model: auto, cpu, cuda."),
)


def open_cache_and_run(pipeline: Pipeline, cache_root: str | None, model: str | None, runs_root: str | None,
                       run: str) -> tuple:
    """The pipeline's cache and a run trained on it (refused, in one line, when it was trained on another)."""
    from ..cache import open_pipeline_cache
    from ..runs import open_run

    cache = open_pipeline_cache(pipeline, cache_root, model=model)
    return cache, open_run(runs_root, cache, run)


def run_options(fn: Any) -> Any:
    for option in reversed(RUN_OPTIONS):
        fn = option(fn)
    return fn


def _one_line(text: str, width: int = 100) -> str:
    text = " / ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= width else text[:width - 1] + "…"


def _report_skips(result: Any, total: int, what: str) -> None:
    if result.skipped:
        say(f"skipped {len(result.skipped)} of {total} {what}", "yellow")
        for item, reason in result.skipped:
            say(f"  {item}: {reason}")
    if result.empty:
        say(f"{len(result.empty)} of {total} texts have no word of the vocabulary; their codes are all the same "
            f"and say nothing about them", "yellow")


@cli.command()
@pipeline_options
@click.argument("more", nargs=-1, metavar="[INPUTS]...")
@click.option("--images", multiple=True, type=click.Path(exists=True), metavar="FILE_OR_DIR",
              help="Image files or folders (searched recursively); repeatable, or list more after the pipeline.")
@click.option("--texts", multiple=True, metavar="TEXT", help="Texts to encode; repeatable.")
@click.option("--text-file", type=click.Path(exists=True, dir_okay=False), help="A UTF-8 file, one text per line.")
@run_options
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image-decoding worker processes (worth it for folders of thousands of images).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True),
              help="Write the codes: .npy (N, bits/8) uint8 packed rows, or .json (inputs with hex codes).")
def encode(pipeline: Pipeline, cache_root: str | None, model: str | None, more: tuple[str, ...],
           images: tuple[str, ...], texts: tuple[str, ...], text_file: str | None, runs_root: str | None, run: str,
           bits: int, image_model: str | None, device: str, workers: int, out: str | None) -> None:
    """Hash new images or texts with a trained model, through the cache's own feature extractor settings
    and vocabulary (read from its manifest), so the codes compare with the cache's codes."""
    from ..encode import CodeEncoder, EncodeError, expand_image_paths, require_computed

    if bool(images) + bool(texts or text_file) != 1:
        raise click.UsageError("give images (--images) or texts (--texts / --text-file), one modality per call")
    modality = "image" if images else "text"
    if modality == "image":
        for extra in more:
            if not Path(extra).exists():
                raise click.BadParameter(f"{extra}: no such image file or folder", param_hint="INPUTS")
        inputs: list[Any] = expand_image_paths([*images, *more])
        if not inputs:
            raise EncodeError(f"no image files (jpg, png, …) in {', '.join([*images, *more])}")
    else:
        inputs = [*texts, *more]
        if text_file:
            inputs += [line.rstrip("\r\n") for line in Path(text_file).read_text(encoding="utf-8").splitlines()]
    cache, store = open_cache_and_run(pipeline, cache_root, model, runs_root, run)
    require_computed(cache, modality)
    with progress() as bar:
        task = bar.add_task(f"{modality}s", total=len(inputs), info="")
        encoder = CodeEncoder(cache, store, bits, image_model=image_model, device=device, workers=workers,
                              on_images=lambda done, total: bar.update(task, completed=done))
        result = encoder.encode(modality, inputs)
        bar.update(task, completed=len(inputs))
    _report_skips(result, len(inputs), f"{modality}s")

    if out is None:
        table = Table(title=f"{pipeline.name}: {len(result.inputs)} {modality} codes ({bits} bits, run {run})")
        table.add_column("input", overflow="fold")
        table.add_column("code (hex)", no_wrap=True)
        for item, code in zip(result.inputs, result.codes):
            table.add_row(_one_line(item, 80), code.tobytes().hex())
        console.print(table)
        return
    path = Path(out)
    if path.suffix == ".npy":
        np.save(path, result.codes)
    elif path.suffix == ".json":
        path.write_text(json.dumps({
            "pipeline": pipeline.name, "cache": cache.url, "run": run, "bits": bits, "modality": modality,
            "codes": "hex of numpy packbits rows (big-endian within a byte, bit set for a +1 code)",
            "items": [{"input": i, "code": c.tobytes().hex()} for i, c in zip(result.inputs, result.codes)],
            "skipped": [{"input": i, "reason": r} for i, r in result.skipped]}, indent=2, ensure_ascii=False))
    else:
        raise click.BadParameter(f"{out}: use a .npy or .json file name", param_hint="--out")
    say(f"wrote {len(result.inputs)} {bits}-bit {modality} codes to {path}"
        + (f" (rows follow the {len(result.inputs)} encoded inputs; skipped ones listed above)"
           if result.skipped and path.suffix == ".npy" else ""))


@cli.command()
@pipeline_options
@click.option("--text", "query_text", default=None, help="A text query: finds images.")
@click.option("--image", "query_image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An image query: finds texts.")
@click.option("--query-id", default=None, help="An item already in the cache (works for precomputed caches too).")
@click.option("--query-modality", type=click.Choice(["image", "text"]), default="image", show_default=True,
              help="With --query-id: search with the item's image code (finds texts) or its text code (finds images).")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="How many results.")
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
def search(pipeline: Pipeline, cache_root: str | None, model: str | None, query_text: str | None,
           query_image: str | None, query_id: str | None, query_modality: str, k: int, runs_root: str | None,
           run: str, bits: int, image_model: str | None, device: str, as_json: bool) -> None:
    """The nearest database items of the other modality for a text, an image, or an item of the cache."""
    from ..encode import CodeEncoder, EncodeError, require_computed
    from ..search import search_cache

    if sum(x is not None for x in (query_text, query_image, query_id)) != 1:
        raise click.UsageError("give exactly one query: --text, --image or --query-id")
    cache, store = open_cache_and_run(pipeline, cache_root, model, runs_root, run)
    if query_id is not None:
        ids = cache.read("ids")
        hits = np.flatnonzero(ids == query_id)
        if hits.size == 0:
            raise EncodeError(f"{cache.url}: no item with id {query_id!r}; ids look like {str(ids[0])!r}")
        source, query = query_modality, {"id": query_id, "row": int(hits[0]), "modality": query_modality}
        codes = store.read_codes(bits, source, cache.n_items)[hits[:1]]
    else:
        source = "text" if query_text is not None else "image"
        require_computed(cache, source)
        encoded = CodeEncoder(cache, store, bits, image_model=image_model, device=device).encode(
            source, [query_text] if query_text is not None else [query_image])
        if encoded.skipped:
            raise EncodeError(f"{query_image}: {encoded.skipped[0][1]}; give a readable image file")
        if encoded.empty:
            raise EncodeError(f"no word of {query_text!r} is in this cache's {len(cache.strings('vocabulary')):,}-"
                              f"term vocabulary, so the query has no features; use other words")
        codes = encoded.codes
        query = {source: query_text if query_text is not None else query_image}
    target = "text" if source == "image" else "image"
    results = search_cache(cache, store, codes, target, bits=bits, k=k)[0]
    query.update(code=codes[0].tobytes().hex(), bits=bits, run=run)

    if as_json:
        click.echo(json.dumps({"pipeline": pipeline.name, "query": query, "target": target, "results": results},
                              indent=2, ensure_ascii=False))
        return
    field = "path" if results and "path" in results[0] else "text"
    described = query.get("text") or query.get("image") or f"{query_modality} of {query_id}"
    table = Table(title=f"{pipeline.name}: top {k} {target}s for {_one_line(str(described), 60)!r} "
                        f"({bits} bits, run {run})")
    table.add_column("rank", justify="right")
    table.add_column("id")
    table.add_column("image path" if field == "path" else "text", overflow="fold")
    table.add_column("distance", justify="right")
    for hit in results:
        table.add_row(str(hit["rank"]), hit["id"], _one_line(hit[field]), str(hit["distance"]))
    console.print(table)

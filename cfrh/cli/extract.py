"""``cfrh extract PIPELINE`` and ``cfrh cache ls | info | verify``."""
from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.table import Table

from ..cache import CacheError, FeatureCache, list_caches, open_pipeline_cache
from ..config import Pipeline, available_pipelines, load_pipeline
from ..locations import cache_root as default_cache_root
from .common import cli, console, pipeline_options, progress, say, with_overrides



def _drops_rows(table: Table, dropped: dict[str, Any]) -> None:
    for reason, count in sorted(dropped.get("by_reason", {}).items(), key=lambda kv: -kv[1]):
        table.add_row(f"  dropped: {reason}", f"{count:,}")


@cli.command()
@pipeline_options
@click.option("--data", "data_root", default=None, metavar="DIR",
              help="The dataset's folder (same as --set dataset.root=DIR).")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache for this pipeline and model first.")
@click.option("--device", default=None, help="auto (GPU when present), cpu, cuda, cuda:N.")
@click.option("--precision", default=None, metavar="auto|fp32|fp16|bf16|int8",
              help="auto: fp16 on a GPU, fp32 on the CPU; int8: dynamic quantisation of Linear layers (CPU).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per model call.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Image-decoding worker processes (default: auto).")
@click.option("--random-weights", is_flag=True,
              help="Build the model's architecture with random weights (benchmarks only; flagged untrained).")
@click.option("--scheduler", default=None, metavar="local:N|tcp://HOST:PORT",
              help="Embed the images on a Dask cluster: N local worker processes, or a scheduler's address "
                   "(pip install 'cfrh[dask]'; the cache must be where every worker can write).")
@click.option("--preprocess", default=None, metavar="auto|fast|reference",
              help="Pixels by the fast rule or the model's own image processor (features.preprocess).")
def extract(pipeline: Pipeline, cache_root: str | None, model: str | None, data_root: str | None, overwrite: bool,
            device: str | None, precision: str | None, batch_size: int | None, workers: int | None,
            random_weights: bool, scheduler: str | None, preprocess: str | None) -> None:
    """Read a dataset, compute CLIP image features and bag-of-words text features, write the cache.

    --model is the CLIP model (a hub id or a local checkpoint directory; overrides features.image_model).
    Rerunning after an interruption resumes where it stopped; a second extraction of the same cache waits
    for the first, then finds it complete."""
    import os

    from ..extraction import extract as run_extract

    pipeline = with_overrides(pipeline, **{"dataset.root": os.path.abspath(data_root) if data_root else None,
                                           "features.random_init": True if random_weights else None})
    with progress() as bar:
        task = bar.add_task("images", total=None, info="reading the dataset")

        def on_images(done: int, total: int, seconds: float) -> None:
            rate = f"{done / seconds:.1f} images/s" if seconds > 0 else ""
            bar.update(task, total=total, completed=done, info=rate)

        def on_status(message: str) -> None:
            bar.update(task, info=message)

        result = run_extract(pipeline, cache_root, overwrite=overwrite, model=model, device=device,
                             precision=precision, batch_size=batch_size, workers=workers, scheduler=scheduler,
                             preprocess=preprocess, on_images=on_images, on_status=on_status)
        bar.update(task, info="done" if bar.tasks[task].total else "no images to extract")
    counts = result.counts
    table = Table(title=f"{pipeline.name}: " + ("already complete" if result.already_complete else
                                                 "resumed and finished" if result.resumed else "extracted"),
                  show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("items", f"{counts.get('items', 0):,}")
    table.add_row("image features", f"{counts.get('image_dim', '?')}-d")
    table.add_row("text features", f"{counts.get('text_dim', '?')}-d"
                  + (f" ({counts['empty_text_rows']:,} empty rows)" if counts.get("empty_text_rows") else ""))
    table.add_row("labels", str(counts.get("labels", 0)))
    table.add_row("query / train / database",
                  f"{counts.get('query', 0):,} / {counts.get('train', 0):,} / {counts.get('database', 0):,}")
    table.add_row("dropped", f"{result.dropped.get('total', 0):,}")
    _drops_rows(table, result.dropped)
    if result.images_per_s and not result.already_complete:
        table.add_row("images/s (this run)", f"{result.images_per_s:.1f}")
    table.add_row("cache", result.cache.url)
    console.print(table)


@cli.group()
def cache() -> None:
    """List, inspect and verify feature caches."""


def _open_target(target: str, cache_root: str | None, overrides: tuple[str, ...]) -> FeatureCache:
    """A cache group by path/URL (a folder holding zarr.json), else the cache of a pipeline name or file."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(target)
    if fs.exists(f"{path.rstrip('/')}/zarr.json"):
        return FeatureCache.at(target)
    return open_pipeline_cache(load_pipeline(target, overrides), cache_root, require_complete=False)


def _caches(targets: tuple[str, ...], cache_root: str | None, overrides: tuple[str, ...]) -> list[FeatureCache]:
    if targets:
        return [_open_target(t, cache_root, overrides) for t in targets]
    found = list_caches(cache_root)
    if not found:
        raise CacheError(f"{cache_root or default_cache_root()}: no feature caches here; run `cfrh extract` first")
    return found


def _dims(m: dict[str, Any], name: str) -> str:
    shape = m.get("shapes", {}).get(name)
    return str(shape[1]) if shape and len(shape) > 1 else "-"


cache_root_option = click.option("--cache", "cache_root", default=None, envvar="CFRH_CACHE",
                                 help="Cache root: a folder or fsspec URL (default ./cache, or $CFRH_CACHE).")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Pipeline overrides, when a target is a pipeline (repeatable).")


@cache.command("ls")
@cache_root_option
def cache_ls(cache_root: str | None) -> None:
    """A table of the caches under the cache root."""
    root = cache_root or default_cache_root()
    table = Table(title=f"feature caches in {root}")
    for col in ("dataset", "feature key", "items", "image dim", "text dim", "complete", "fingerprint"):
        table.add_column(col, justify="right" if col in ("items", "image dim", "text dim") else "left")
    for fc in list_caches(root):
        m = fc.manifest
        items = m.get("found", {}).get("counts", {}).get("items")
        dataset, key = fc.url.rstrip("/").rsplit("/", 2)[-2:]
        table.add_row(dataset, key, f"{items:,}" if items is not None else "-", _dims(m, "image"), _dims(m, "text"),
                      "yes" if m.get("complete") else "[yellow]no[/yellow]", m.get("fingerprint") or "-")
    console.print(table)


@cache.command("info")
@click.argument("target", metavar="PIPELINE-OR-PATH")
@cache_root_option
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def cache_info(target: str, cache_root: str | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """The manifest of one cache: what was asked for, what was found, the arrays."""
    fc = _open_target(target, cache_root, overrides)
    m = fc.manifest
    if as_json:
        click.echo(json.dumps(m, indent=2, sort_keys=True))
        return
    req, found = m.get("request", {}), m.get("found", {})
    image, text, dataset = req.get("image", {}), req.get("text", {}), req.get("dataset", {})
    table = Table(title=fc.url, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("complete", f"yes (finished {m.get('finished')})" if m.get("complete") else
                  "[yellow]no[/yellow]: rerun `cfrh extract` to resume")
    table.add_row("dataset", f"{dataset.get('name')} (reader {dataset.get('reader')}, fingerprint "
                  f"{dataset.get('fingerprint')})")
    table.add_row("image model", f"{image.get('model')} @ {image.get('revision')} — {image.get('weights', '')}")
    if image.get("precision"):
        table.add_row("precision", f"{image['precision']}" + (f", {image['quantization']}"
                                                             if image.get("quantization") else ""))
        pre = image.get("preprocessing", {})
        table.add_row("preprocessing", f"{pre.get('image_processor_type')}: resize {pre.get('size')}, "
                      f"crop {pre.get('crop_size')}, mean {pre.get('image_mean')}, std {pre.get('image_std')}")
        table.add_row("image embedding", str(image.get("embedding")))
    table.add_row("text", ", ".join(f"{k}={v}" for k, v in text.items()))
    table.add_row("split", ", ".join(f"{k}={v}" for k, v in req.get("split", {}).items()))
    for k, v in found.get("counts", {}).items():
        table.add_row(f"  {k}", f"{v:,}" if isinstance(v, int) else str(v))
    _drops_rows(table, found.get("dropped", {}))
    thr = found.get("image", {}).get("throughput")
    if thr:
        table.add_row("last run", f"{thr['images']:,} images in {thr['seconds']:.1f} s "
                      f"({thr['images_per_s']} images/s) on {found['image'].get('device')}")
    table.add_row("arrays", ", ".join(f"{k} {tuple(v)}" for k, v in m.get("shapes", {}).items()))
    table.add_row("fingerprint", str(m.get("fingerprint")))
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in found.get("versions", {}).items()))
    console.print(table)


@cache.command("verify")
@click.argument("targets", nargs=-1, metavar="[PIPELINE-OR-PATH]...")
@cache_root_option
@set_option
def cache_verify(targets: tuple[str, ...], cache_root: str | None, overrides: tuple[str, ...]) -> None:
    """Re-check every block of every array against the digests in its manifest (all caches under the root by
    default), listing each bad or missing block. Exits with status 1 when any cache is incomplete or altered."""
    import fsspec

    from ..locations import join

    bad = 0
    if targets:
        found = []
        for t in targets:
            try:
                found.append(_open_target(t, cache_root, overrides))
            except CacheError as e:   # an unreadable manifest is a finding too
                bad += 1
                say(f"FAIL {t}: {e}", "red")
    else:
        root = default_cache_root(cache_root)
        fs, path = fsspec.core.url_to_fs(root)
        groups = [g.rstrip("/") for g in (fs.glob(join(path, "*", "*", "zarr.json")) if fs.isdir(path) else [])]
        if not groups:
            raise CacheError(f"{root}: no feature caches here; run `cfrh extract` first")
        found = []
        for g in sorted(groups):
            url = root.rstrip("/") + "/" + "/".join(g.rsplit("/", 3)[-3:-1])
            try:
                found.append(FeatureCache.at(url))
            except CacheError as e:
                bad += 1
                say(f"FAIL {url}: {e}", "red")
    for fc in found:
        problems = fc.verify()
        if problems:
            bad += 1
            say(f"FAIL {fc.url}", "red")
            for p in problems:
                say(f"  {p}")
        else:
            console.print(f"ok   {fc.url} ({len(fc.manifest.get('checksums', {}))} arrays, every block checked)",
                          highlight=False, markup=False)
    if bad:
        say(f"{bad} cache(s) with problems; re-extract them with `cfrh extract PIPELINE --overwrite`", "red")
        sys.exit(1)


@cli.command("pipelines")
def pipelines_command() -> None:
    """The packaged pipelines, with their readers and dataset roots (relative roots: the working directory)."""
    table = Table(title="pipelines (cfrh PIPELINE, or a path to your own .toml)")
    for col in ("name", "reader", "dataset root", "found", "image model"):
        table.add_column(col)
    for name in available_pipelines():
        p = load_pipeline(name)
        root = p.dataset.get("root")
        resolved = p.resolve_path(root) if root else None
        table.add_row(name, str(p.dataset.get("reader")), str(resolved) if resolved else "-",
                      "yes" if resolved is not None and resolved.exists() else "no",
                      str(p.features.get("image_model", "precomputed")))
    console.print(table)
    say("give another dataset folder with --data DIR or --set dataset.root=DIR")


__all__ = ["extract", "cache", "pipelines_command"]

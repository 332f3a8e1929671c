"""``cfrh serve PIPELINE``: the search service and its web page (:mod:`cfrh.serve`) on uvicorn."""
from __future__ import annotations

import ipaddress

import click

from ..config import Pipeline
from .common import cli, err_console, pipeline_options, say
from .search import open_cache_and_run, run_options


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@cli.command()
@pipeline_options
@run_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default is reachable from this machine only; 0.0.0.0 opens it to "
                   "the network (then set a token).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--token", envvar="CFRH_SERVE_TOKEN", default=None,
              help="Require this token on every request (header 'Authorization: Bearer T' or ?token=T; the page "
                   "passes it on). Prefer $CFRH_SERVE_TOKEN: a command line is visible to other users.")
@click.option("--images-root", type=click.Path(file_okay=False), default=None,
              help="Folder the cache's image paths are relative to (default: the folder the cache was extracted "
                   "from, else the pipeline's dataset.root).")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.001), default=10.0, show_default=True,
              help="Largest image upload accepted.")
@click.option("--access-log", is_flag=True, help="Log every request (urls given ?token=T then hold the token).")
def serve(pipeline: Pipeline, cache_root: str | None, model: str | None, runs_root: str | None, run: str, bits: int,
          image_model: str | None, device: str, host: str, port: int, token: str | None, images_root: str | None,
          max_upload_mb: float, access_log: bool) -> None:
    """Serve a search API and a web page over a trained run: words find images, an image finds texts, a
    stored item finds its neighbours, with thumbnails from the dataset.

    The model, codes and one Hamming index per modality load once at start; requests run concurrently.
    Open http://HOST:PORT/ (or /?q=red+circle to search on load). API: GET /api/search?text=...&k=10,
    GET /api/search?id=ITEM&modality=image|text, POST /api/search with an image, GET /api/items/ITEM,
    GET /images/ITEM, GET /healthz.
    """
    try:
        import uvicorn

        from ..serve.app import LOOPBACK_HOSTS, create_app
    except ImportError as e:
        raise click.ClickException(f"cfrh serve needs starlette, uvicorn and python-multipart ({e.name} is "
                                   f"missing): pip install 'cfrh[serve]'") from None
    from ..serve.service import SearchService, images_root as find_images

    cache, store = open_cache_and_run(pipeline, cache_root, model, runs_root, run)
    with err_console.status("loading the model, the codes and the indexes"):
        service = SearchService(cache, store, bits, images=find_images(cache, pipeline, images_root),
                                image_model=image_model, device=device, max_upload=int(max_upload_mb * 2**20))
        service.warm_up()
    for warning in cache.warnings():
        say(warning, "yellow")
    for modality, why in service.unavailable.items():
        say(f"{modality} queries are off: {why}", "yellow")
    if not service.has_images:
        say("no thumbnails: the cache stores no image paths, or its dataset folder is not here (--images-root)",
            "yellow")
    loopback = is_loopback(host)
    if not loopback and not token:
        say(f"listening on {host} without a token: anyone who can reach this port can search and see the "
            f"images; set --token or $CFRH_SERVE_TOKEN", "yellow")
    app = create_app(service, token=token or None, allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    where = f"[{host}]" if ":" in host else host
    say(f"serving {pipeline.name} (run {run}, {bits} bits, {len(service.indexes['image']):,} items) on "
        f"http://{where}:{port}/" + (" — token required" if token else "") + "; Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=access_log, server_header=False)

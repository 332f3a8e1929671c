"""``cfrh serve``: a search service over a trained run, and a web page to look at what the codes retrieve.

:mod:`cfrh.serve.service` loads the model, codes and indexes once and answers queries (no web framework);
:mod:`cfrh.serve.app` puts it behind HTTP (Starlette: the JSON API, thumbnails, ``page.html``). Only the
service is imported here, so the package imports without the ``serve`` extra installed.
"""
from __future__ import annotations

from .service import MAX_K, SearchService, ServeError, images_root

__all__ = ["SearchService", "ServeError", "MAX_K", "images_root"]

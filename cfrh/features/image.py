"""The CLIP image tower: load a checkpoint (hub id or local directory), preprocess with the
model's own image processor, and turn images into L2-normalised projection embeddings.

Only the vision half of a CLIP checkpoint is loaded (``CLIPVisionModelWithProjection``): the
text tower is never used, because CFRH represents texts as bags of words. Loading is split in
two so that extraction can start decoding images while the weights load:

* :func:`resolve_clip` reads what is cheap (config, image processor, revision) and is enough
  to write the cache manifest;
* :func:`load_clip` then builds the model on a device, in a precision, optionally with
  dynamic int8 quantisation of its Linear layers (CPU only).

``random_init`` builds the real architecture from a config-only directory with seeded random
weights; the result is flagged ``weights: random-init`` everywhere it is recorded, since its
embeddings carry no meaning (benchmarks and demos only).

A hub id that is not in the local Hugging Face cache is fetched only after one short TCP check of
the hub (:func:`hub_reachable`), so an offline machine fails in seconds with one line instead of
waiting through the hub client's retries.

Image files become the 8-bit RGB images the processor sees by one rule (:func:`decode_image`,
:func:`to_rgb`), recorded in the cache request as ``decoding``:

* an image over ``features.max_image_pixels`` (width × height, read from the header before any
  pixel is decoded) is a counted drop; Pillow's own decompression-bomb check gives way to it (and is
  left at the same limit), so Pillow neither warns nor raises first;
* a large image is decoded at reduced size, never much above twice the model's input edge: JPEG by
  DCT scaling (``draft``), 8-bit PNG in row strips that are box-reduced as they are decoded, any
  other format decoded once and box-reduced (``Image.reduce``) — so the memory one image takes is
  bounded by a strip (JPEG, PNG) or by the pixel limit (other formats);
* 16-bit and other high-bit-depth images are scaled to 8 bits, not clipped: ``I;16*`` by
  65535 → 255; ``I`` (32-bit integers) the same when its values fit 16 bits, else by its maximum;
  ``F`` (floats) by 255 when its values lie in [0, 1], else as 0–255 values (NaN → 0);
* transparent images (RGBA, LA, P or RGB/L with a transparency key) are composited on
  ``features.background`` (default white) instead of showing the colour hidden under transparent
  pixels.

An image comes from a file path or from a member of a tar shard (:class:`ImageMember`, the
WebDataset layout), which the decoders read in place by ranged reads (:func:`read_members`), one
read per run of adjacent members, so shards are never unpacked and an object store serves a batch
in one request.

Pixels (``features.preprocess``, recorded in the cache request): ``reference`` runs the model's own
image processor; ``fast`` (:class:`PixelRule`) computes the same steps — shorter side resized to the
processor's edge with its resample filter, centre crop, rescale, normalise — for less per core, decode
included (``benchmarks/extract.py``, ``preprocess_vs_reference``): a JPEG at least twice the edge is
decoded DCT-scaled (``draft``) to no less than the edge, the resize runs on 8-bit pixels with torch's
antialiased kernels (Pillow's filters within 2 levels), decoders hand over 8-bit crops (a quarter of the
bytes to pass between processes or to a GPU), and rescale and normalisation are one vectorised
multiply-add on the model's device. Its embeddings match the reference's to a cosine of 0.999 or more on
the COCO sample with the ViT-B/32 architecture (tested; the benchmark prints the minimum).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import io
import itertools
import logging
import os
import queue
import re
import socket
import struct
import sys
import threading
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor

from ..errors import CfrhError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# Processor settings that change the pixels a model sees (the manifest records these, not class names,
# which differ between transformers 4.x and 5.x for the same preprocessing).
QUANTIZATION = {"int8": "dynamic int8 (torch.ao quantize_dynamic, Linear layers)"}
_PREPROCESSING_KEYS = ("image_processor_type", "do_resize", "size", "resample", "do_center_crop", "crop_size",
                       "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


HUB_TIMEOUT_S = 3.0  # one TCP connect to the hub: a reachable hub answers in well under a second
# The decoding rule's version: bump it when decode_image/to_rgb change the pixels of some image, so caches
# built with the old rule are told apart (it is part of the cache request).
DECODING_RULE = "cfrh-decode-2: reduced to >= 2x input edge; high bit depth scaled; alpha on background"
# What the fast pixel rule computes (features.preprocess = "fast"), recorded beside it in the cache request.
PIXEL_RULE = "cfrh-fast-2: DCT-scaled JPEG >= 2x edge; torch 8-bit antialiased resize; centre crop"
_STRIP_BYTES = 1 << 22  # PNG strips: about 4 MB of decoded rows at a time


class ModelLoadError(CfrhError, OSError):
    """An image model cannot be found or loaded; the message says where to point instead."""


class ImageSettingsError(CfrhError, ValueError):
    """A ``[features]`` image-decoding setting has a value cfrh cannot use; the message names the key."""


class ImageRejected(Exception):
    """An image file that is not used, for a reason that goes into the drop report as it is."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _offline_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or Path(model).expanduser().exists()


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load-time chatter (unused text-tower weights, processor backend notes)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].rstrip(".") if text else type(err).__name__


def _hub_error(model: str, why: str) -> ModelLoadError:
    """The one wording of "this hub model cannot be had here", with the fixes."""
    return ModelLoadError(
        f"cannot load image model {model!r}: {why}; download it where the hub is reachable "
        f"(`hf download {model} --local-dir DIR`) and point at that directory with --model DIR "
        f"(or features.image_model = \"DIR\" in the pipeline)")


def hub_endpoint() -> str:
    """The Hugging Face endpoint the hub client talks to (``HF_ENDPOINT`` read now, not at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint (or to the proxy that reaches it), so an offline machine is
    told in seconds instead of waiting through the hub client's retries. False in offline mode."""
    if _offline_env():
        return False
    url = urlparse(hub_endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname, parsed.port or 8080
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _require_hub(model: str) -> None:
    """Fail at once, in one line, when a hub model must be fetched and the hub does not answer."""
    if not hub_reachable():
        raise _hub_error(model, f"it is not in the local Hugging Face cache and the hub ({hub_endpoint()}) did "
                                f"not answer within {HUB_TIMEOUT_S:g} s (to use cached files only, set "
                                f"HF_HUB_OFFLINE=1)")


def _from_pretrained(loader: Any, model: str, local_files_only: bool | None, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` for a local directory or a hub id: the local HF cache first (no network
    when the files are there), the hub only when not offline; hub failures become one-line errors."""
    if _looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"{path}: model directory not found; give an existing checkpoint directory "
                                 f"or a hub id such as openai/clip-vit-base-patch32")
        with _quiet_transformers():
            return loader.from_pretrained(str(path.resolve()), local_files_only=True, **kwargs)
    offline = _offline_env() if local_files_only is None else bool(local_files_only)
    try:
        with _quiet_transformers():
            return loader.from_pretrained(model, local_files_only=True, **kwargs)
    except OSError:
        if offline:
            raise _hub_error(model, "offline mode is on (HF_HUB_OFFLINE / local_files_only) and it is not in "
                                    "the local Hugging Face cache") from None
    _require_hub(model)
    try:
        with _quiet_transformers():
            return loader.from_pretrained(model, **kwargs)
    except OSError as err:
        raise _hub_error(model, f"the Hugging Face hub has no such model or refused it ({_first_line(err)})") \
            from None


def _hub_commit(model: str) -> str | None:
    """The commit hash of a hub model's files in the local HF cache (``snapshots/<hash>/``), if known."""
    try:
        from transformers.utils import cached_file

        path = cached_file(model, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        return None
    m = re.search(r"snapshots[\\/]([0-9a-f]{40})[\\/]", str(path or ""))
    return m.group(1) if m else None


def _weights_digest(directory: Path) -> str | None:
    """sha256 of a local checkpoint's weight files: the revision of a model that has no hub commit."""
    files = [directory / f for f in _WEIGHT_FILES if (directory / f).is_file()]
    files += sorted(p for p in directory.glob("model-*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def preprocessing_summary(processor: Any) -> dict[str, Any]:
    """The settings of an image processor that determine the pixels the model sees."""
    d = processor.to_dict()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k in _PREPROCESSING_KEYS}


# -- image files → 8-bit RGB ----------------------------------------------------------------------
@dataclass(frozen=True)
class ImageDecoding:
    """How image files become the RGB images the processor sees (the module docstring has the rule).

    ``edge``: the processor's output edge in pixels; images are reduced to no less than twice it, so
    the processor's own resize still does the final, antialiased step. ``max_pixels``: width × height
    above which a file is dropped (0: no limit). ``background``: RGB under transparent pixels."""

    edge: int = 224
    max_pixels: int = 0
    background: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def for_edge(cls, edge: int, max_image_pixels: Any = None, background: Any = None) -> "ImageDecoding":
        """The rule for a processor of output ``edge`` with ``features.max_image_pixels`` and
        ``features.background`` validated (None: ``cfrh.extraction.FEATURE_DEFAULTS``'s, their one owner)."""
        from ..extraction import FEATURE_DEFAULTS

        max_image_pixels = FEATURE_DEFAULTS["max_image_pixels"] if max_image_pixels is None else max_image_pixels
        background = FEATURE_DEFAULTS["background"] if background is None else background
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 0:
            raise ImageSettingsError(f"features.max_image_pixels = {max_image_pixels!r}; it must be a whole "
                                     f"number of pixels (width × height), or 0 for no limit")
        try:
            colour = ImageColor.getrgb(str(background))[:3]
        except ValueError:
            raise ImageSettingsError(f"features.background = {background!r}: not a colour; use a name (white, "
                                     f"black), #rrggbb or rgb(r, g, b)") from None
        return cls(edge=int(edge), max_pixels=max_image_pixels, background=colour)

    @property
    def over_limit(self) -> str:
        """The drop reason of an image over the pixel limit (one reason for all, so the report counts them)."""
        return f"image over features.max_image_pixels ({self.max_pixels:,} pixels)"

    def describe(self) -> dict[str, Any]:
        """The cache-request record: what changes the pixels of some image."""
        return {"rule": DECODING_RULE, "max_image_pixels": self.max_pixels,
                "background": "#{:02x}{:02x}{:02x}".format(*self.background)}


def _reduce_factor(size: tuple[int, int], edge: int) -> int:
    """The integer box-reduction that keeps the shorter side at least twice ``edge`` (1: none)."""
    return max(1, min(size) // (2 * edge)) if edge > 0 else 1


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    """``I;16*``, ``I`` or ``F`` → ``L``, scaled (not clipped) by the module docstring's rule; row strips keep
    the float copy small for a full-size 16-bit image."""
    w, h = im.size
    if im.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:  # I and F are box-reduced before they come here, so one pass over them is cheap
        values = np.asarray(im, dtype=np.float64)
        top = float(np.nanmax(values)) if values.size and not np.isnan(values).all() else 0.0
        if im.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if top <= 65535 else 255.0 / top
    out = np.empty((h, w), dtype=np.uint8)
    step = max(1, _STRIP_BYTES // (8 * max(w, 1)))
    for y in range(0, h, step):
        strip = np.asarray(im.crop((0, y, w, min(h, y + step))), dtype=np.float64) * scale
        out[y:y + step] = np.rint(np.clip(np.nan_to_num(strip, nan=0.0), 0.0, 255.0))
    return Image.fromarray(out, "L")


def _reducible(im: Image.Image) -> Image.Image:
    """A mode ``Image.reduce`` handles, keeping transparency as alpha: palette and colour-key images become
    RGBA (or RGB), 1-bit becomes L, 16-bit becomes scaled L."""
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        return im.convert("RGBA")
    if im.mode.startswith("I;16"):
        return _high_bit_to_l(im)
    return {"P": lambda: im.convert("RGB"), "PA": lambda: im.convert("RGBA"),
            "1": lambda: im.convert("L")}.get(im.mode, lambda: im)()


def to_rgb(im: Image.Image, decoding: ImageDecoding) -> Image.Image:
    """A decoded image → a new 8-bit RGB image: box-reduced to about twice the model's input edge, high
    bit depths scaled to 8 bits, transparency composited on ``decoding.background``."""
    im = _reducible(im)
    factor = _reduce_factor(im.size, decoding.edge)
    if factor > 1:
        im = im.reduce(factor)  # Pillow reduces LA/RGBA premultiplied: hidden colours do not bleed
    if im.mode in ("I", "F"):
        im = _high_bit_to_l(im)
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        under = Image.new("RGBA", im.size, (*decoding.background, 255))
        im = Image.alpha_composite(under, im.convert("RGBA"))
    return im.convert("RGB")  # always a copy: the caller may close the file's image


def _chunks(f: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """(type, data length) of each PNG chunk after the signature; the reader stands at the chunk's data."""
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise OSError("image file is truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", head)
        yield kind, length


def _png_rows(f: BinaryIO, chunks: Iterator[tuple[bytes, int]], length: int, row: int) -> Iterator[bytes]:
    """Whole filtered scanlines (``row`` bytes each, filter byte included) of the IDAT stream that starts
    with the ``length``-byte chunk at the reader's position, inflated a few MB at a time (a small
    compressed file can inflate to gigabytes). Chunk checksums are verified."""
    inflate, pending = zlib.decompressobj(), bytearray()
    kind = b"IDAT"
    while kind == b"IDAT":
        crc = zlib.crc32(kind)
        while length > 0:
            piece = f.read(min(1 << 20, length))
            if not piece:
                raise OSError("image file is truncated (IDAT chunk)")
            length -= len(piece)
            crc = zlib.crc32(piece, crc)
            while piece:
                pending += inflate.decompress(piece, _STRIP_BYTES)
                piece = inflate.unconsumed_tail
                whole = len(pending) // row * row
                if whole:
                    yield bytes(pending[:whole])
                    del pending[:whole]
        if f.read(4) != struct.pack(">I", crc & 0xFFFFFFFF):
            raise SyntaxError("broken PNG file (IDAT checksum)")
        kind, length = next(chunks)
    pending += inflate.flush()  # the few bytes zlib may still hold when the last call hit its output bound
    if len(pending) >= row:
        yield bytes(pending[:len(pending) // row * row])


def _mini_png(width: int, header: bytes, rows: bytes, row: int) -> Image.Image:
    """Filtered scanlines decoded by Pillow's own PNG decoder, as a PNG of their own."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    ihdr = struct.pack(">II", width, len(rows) // row) + header
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 0))
            + chunk(b"IEND", b""))
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # 8-bit colour types whose decoded bytes are the PNG's


def _png_reduced(source: str | BinaryIO, factor: int) -> Image.Image | None:
    """An 8-bit, non-interlaced PNG without a transparency key, box-reduced by ``factor`` while it is
    decoded in strips of rows, so that only one strip is ever held decoded (None for any other PNG,
    which is then decoded whole).

    Each strip is decoded by Pillow as a small PNG of its own, led by the previous strip's last row
    stored unfiltered (filter 0), which the strip's first filters refer to. Strips hold a multiple of
    ``factor`` rows, so the result equals reducing the whole decoded image. ``source``: a path, or a
    seekable file object (read from its start)."""
    if not isinstance(source, str):
        source.seek(0)
    with open(source, "rb") if isinstance(source, str) else contextlib.nullcontext(source) as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        chunks = _chunks(f)
        kind, length = next(chunks)
        ihdr = f.read(length)
        f.read(4)
        if kind != b"IHDR" or len(ihdr) != 13:
            return None
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
        if depth != 8 or colour not in _PNG_MODES or interlace or not width or not height:
            return None
        for kind, length in chunks:
            if kind == b"IDAT":
                break
            if kind in (b"tRNS", b"IEND"):
                return None
            f.seek(length + 4, os.SEEK_CUR)
        row = width * len(_PNG_MODES[colour]) + 1
        strip = factor * max(1, _STRIP_BYTES // (row * factor)) * row
        out = Image.new(_PNG_MODES[colour], (-(-width // factor), -(-height // factor)))
        done, lead, pending = 0, b"", bytearray()
        for block in _png_rows(f, chunks, length, row):
            pending += block
            while len(pending) >= strip or (pending and done * row + len(pending) >= height * row):
                take = bytes(pending[:min(strip, (height - done) * row)])
                del pending[:len(take)]
                decoded = _mini_png(width, ihdr[8:], lead + take, row)
                if lead:
                    decoded = decoded.crop((0, 1, width, decoded.height))
                lead = b"\x00" + decoded.crop((0, decoded.height - 1, width, decoded.height)).tobytes()
                out.paste(decoded.reduce(factor), (0, done // factor))
                done += decoded.height
                if done >= height:
                    return out
    raise OSError(f"image file is truncated ({done} of {height} rows)")


def _open(source: str | BinaryIO, decoding: ImageDecoding) -> Image.Image:
    """``Image.open`` with our pixel limit in place of Pillow's decompression-bomb check, so an image over
    it is a counted drop, not a Pillow warning or traceback. Pillow's check is off while the header is
    read (the size is checked here, before any pixel is decoded) and is left at our limit for the rest
    of the process (``Image.MAX_IMAGE_PIXELS`` is process-wide; it is reset, not restored, so two
    decoding threads cannot leave it off)."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        im = Image.open(source)
    finally:
        Image.MAX_IMAGE_PIXELS = decoding.max_pixels or None
    if decoding.max_pixels and im.width * im.height > decoding.max_pixels:
        im.close()
        raise ImageRejected(decoding.over_limit)
    return im


# An image as the decoders take it: a file path, or an image file's bytes (a shard member read by read_members).
ImageBytes = bytes | bytearray | memoryview


@contextlib.contextmanager
def _loaded(source: str | os.PathLike | ImageBytes, decoding: ImageDecoding,
            jpeg_edge: int = 0) -> Iterator[Image.Image]:
    """The image of ``source`` decoded (no more pixels than needed, the module docstring's rule), still
    open. ``jpeg_edge`` > 0: a JPEG whose shorter side is at least twice it is decoded DCT-scaled to no
    less than it (the fast pixel rule resamples from there)."""
    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else None
    target: str | BinaryIO = data if data is not None else os.fspath(source)
    with _open(target, decoding) as im:
        factor = _reduce_factor(im.size, decoding.edge)
        if factor > 1 and im.format == "PNG" and "transparency" not in im.info:
            reduced = _png_reduced(target, factor)
            if reduced is not None:
                yield reduced
                return
        short = min(im.size)
        if jpeg_edge and im.format == "JPEG" and short >= 2 * jpeg_edge:
            im.draft(None, (-(-im.width * jpeg_edge // short), -(-im.height * jpeg_edge // short)))
        elif factor > 1:
            im.draft(None, (-(-im.width // factor), -(-im.height // factor)))  # JPEG: DCT scaling; else no-op
        try:
            im.load()  # the full decode: truncated files fail here
        except Image.DecompressionBombError:  # a frame or layer larger than the image's own size
            raise ImageRejected(decoding.over_limit) from None
        yield im


def decode_image(source: str | os.PathLike | ImageBytes, decoding: ImageDecoding) -> Image.Image:
    """An image file (a path, or its bytes) → the 8-bit RGB image the processor sees (the module docstring's
    rule), decoding no more pixels than needed; raises :class:`ImageRejected` for a file over the pixel
    limit, and whatever Pillow raises for a file that does not decode."""
    with _loaded(source, decoding) as im:
        return to_rgb(im, decoding)


def decode_pixels(source: str | os.PathLike | ImageBytes, decoding: ImageDecoding, rule: "PixelRule") -> np.ndarray:
    """An image file → the (H, W, 3) uint8 crop the fast pixel rule feeds the model: decoded as
    :func:`decode_image` does except that a large JPEG is DCT-scaled down to the rule's edge, then resized on
    8-bit pixels and cropped (:meth:`PixelRule.crop`). Raises as :func:`decode_image` does."""
    with _loaded(source, decoding, jpeg_edge=rule.edge) as im:
        plain = im.mode == "RGB" and _reduce_factor(im.size, decoding.edge) == 1
        return rule.crop(im if plain else to_rgb(im, decoding))


# -- where image bytes come from: files, or members of tar shards ---------------------------------
@dataclass(frozen=True)
class ImageMember:
    """An image stored in an uncompressed tar shard (the WebDataset / img2dataset layout): ``size`` bytes at
    ``offset`` of ``archive`` (a local path or any fsspec URL), found by the reader's one pass over the
    shard's headers. Decoders read it in place (:func:`read_members`); nothing is unpacked to disk."""

    archive: str
    name: str
    offset: int
    size: int

    def relative_to(self, root: str | os.PathLike) -> str:
        """``<shard path under root>/<member name>``: what the cache stores as the item's image path."""
        base = str(root).rstrip("/") + "/"
        archive = self.archive[len(base):] if self.archive.startswith(base) else self.archive
        return f"{archive}/{self.name}"


def _member_runs(members: Sequence[ImageMember], gap: int) -> Iterator[tuple[str, int, int, list[int]]]:
    """(archive, start, stop, indices into ``members``) of each run of members of one archive whose byte
    ranges lie at most ``gap`` bytes apart (a tar puts a 512-byte header, and a sample's text and metadata
    members, between two images)."""
    order = sorted(range(len(members)), key=lambda i: (members[i].archive, members[i].offset))
    run: list[int] = []
    for i in order:
        m = members[i]
        if run:
            last = members[run[-1]]
            if m.archive != last.archive or m.offset - (last.offset + last.size) > gap:
                yield last.archive, members[run[0]].offset, max(members[j].offset + members[j].size for j in run), run
                run = []
        run.append(i)
    if run:
        last = members[run[-1]]
        yield last.archive, members[run[0]].offset, max(members[j].offset + members[j].size for j in run), run


def read_members(members: Sequence[ImageMember], gap: int = 1 << 20) -> list[bytes]:
    """The bytes of each member, one ranged read (``fsspec`` ``cat_file``) per run of nearby members of a
    shard: a batch of a shard's consecutive samples is one request to an object store, one seek locally."""
    import fsspec

    out: list[bytes] = [b""] * len(members)
    for archive, start, stop, run in _member_runs(members, gap):
        fs, path = fsspec.core.url_to_fs(archive)
        data = fs.cat_file(path, start=start, end=stop)
        for i in run:
            out[i] = data[members[i].offset - start:members[i].offset - start + members[i].size]
    return out


def _fetched(sources: Sequence[Any]) -> list[Any]:
    """``sources`` with every :class:`ImageMember` replaced by its bytes (read together), paths as they are."""
    members = [i for i, s in enumerate(sources) if isinstance(s, ImageMember)]
    if not members:
        return list(sources)
    out = list(sources)
    for i, data in zip(members, read_members([sources[i] for i in members])):
        out[i] = data
    return out


# -- the model's pixels, the fast way ----------------------------------------------------------------
# Pillow filters torch resamples the same way (antialiased when shrinking), by their Pillow numbers.
_TORCH_RESAMPLE = {int(Image.Resampling.BILINEAR): "bilinear", int(Image.Resampling.BICUBIC): "bicubic"}


@dataclass(frozen=True)
class PixelRule:
    """What a shortest-edge-resize + centre-crop image processor (CLIP's) computes, as one 8-bit resample and
    one multiply-add: ``edge`` (the shorter side after resizing), ``size`` (crop height, width), ``resample``
    (the processor's PIL filter), per channel ``scale`` = rescale_factor / std and ``offset`` = -mean / std.

    The resize uses the processor's own output size (``int(edge * long / short)``), so the crop lands on the
    same pixels. Differences from the processor: a DCT-scaled JPEG (:func:`decode_pixels`) and the 8-bit
    resampling kernel (±2 levels on a few pixels; Pillow's box resample, for other filters: ±1)."""

    edge: int
    size: tuple[int, int]
    resample: int
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]

    @classmethod
    def of(cls, processor: Any) -> "PixelRule | None":
        """The rule of ``processor``, or None when it does something else (then only ``reference`` works)."""
        d = processor.to_dict()
        size = {k: v for k, v in dict(d.get("size") or {}).items() if v is not None}
        crop = dict(d.get("crop_size") or {})
        flags = all(d.get(k) for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"))
        if not flags or set(size) != {"shortest_edge"} or not crop.get("height") or not crop.get("width"):
            return None
        edge, height, width = int(size["shortest_edge"]), int(crop["height"]), int(crop["width"])
        mean, std = (np.broadcast_to(np.asarray(d.get(k), dtype=np.float64), (3,)) for k in ("image_mean", "image_std"))
        if max(height, width) > edge or d.get("do_pad") or d.get("resample") is None:
            return None   # a crop larger than the resized image is padded: not this rule
        return cls(edge=edge, size=(height, width), resample=int(d["resample"]),
                   scale=tuple(float(d["rescale_factor"]) / std), offset=tuple(-mean / std))

    def crop(self, im: Image.Image) -> np.ndarray:
        """An RGB image → the (H, W, 3) uint8 crop: resized as the processor resizes, centre-cropped.

        Bilinear and bicubic (CLIP's) resample with torch's antialiased 8-bit kernels, which follow Pillow's
        filters (a = −0.5, the same support when shrinking) within 2 levels and run ~3.7× faster than Pillow's
        bicubic on one core (measured on COCO-MINI); other filters resample the crop box with Pillow."""
        w, h = im.size
        if w <= h:   # the processor's output size (transformers' get_resize_output_image_size)
            new_w, new_h = self.edge, int(self.edge * h / w)
        else:
            new_w, new_h = int(self.edge * w / h), self.edge
        ch, cw = self.size
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        mode = _TORCH_RESAMPLE.get(self.resample)
        if mode is None:
            sx, sy = w / new_w, h / new_h
            box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
            return np.asarray(im.resize((cw, ch), Image.Resampling(self.resample), box=box))
        pixels = torch.from_numpy(np.array(im)).permute(2, 0, 1).unsqueeze(0)   # channels-last uint8 view
        resized = F.interpolate(pixels, size=(new_h, new_w), mode=mode, antialias=True)
        return resized[0, :, top:top + ch, left:left + cw].permute(1, 2, 0).numpy()

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 crops, on any device → (B, 3, H, W) float32 model input: rescale and normalise
        in one multiply-add, on the device the model runs on."""
        b, h, w, _ = crops.shape
        out = torch.empty((b, 3, h, w), dtype=torch.float32, device=crops.device)
        out.copy_(crops.permute(0, 3, 1, 2))
        scale = torch.tensor(self.scale, dtype=torch.float32, device=crops.device).view(1, 3, 1, 1)
        offset = torch.tensor(self.offset, dtype=torch.float32, device=crops.device).view(1, 3, 1, 1)
        return out.mul_(scale).add_(offset)


PREPROCESS = ("auto", "fast", "reference")


def pixel_rule(processor: Any, preprocess: str = "reference") -> PixelRule | None:
    """The fast rule for ``features.preprocess`` (None: the model's own processor). ``auto`` is ``fast`` when
    the processor is one the rule reproduces (CLIP's are), else ``reference``."""
    if preprocess not in PREPROCESS:
        raise ImageSettingsError(f"features.preprocess = {preprocess!r}; choose one of {', '.join(PREPROCESS)}")
    if preprocess == "reference":
        return None
    rule = PixelRule.of(processor)
    if rule is None and preprocess == "fast":
        raise ImageSettingsError(f"features.preprocess = \"fast\" reproduces shortest-edge resize + centre crop "
                                 f"processors only, not this {type(processor).__name__}; set it to \"reference\"")
    return rule


@dataclass
class ClipSpec:
    """What is known about an image model before its weights are loaded: enough for the manifest."""

    model: str  # as given: hub id or local directory
    source: str  # what from_pretrained is called with (absolute directory, or the hub id)
    config: Any  # CLIPVisionConfig
    processor: Any  # the model's own image processor
    revision: str | None
    random_init: bool = False
    seed: int = 0
    local_files_only: bool | None = None
    local: bool = False
    decoding: ImageDecoding = field(default_factory=ImageDecoding)
    pixels: PixelRule | None = None  # the fast pixel rule; None: the processor itself (features.preprocess)

    @property
    def preprocess(self) -> str:
        """What computes the model's pixels, as the cache request records it: ``fast`` or ``reference``."""
        return "reference" if self.pixels is None else "fast"

    @property
    def dim(self) -> int:
        return int(self.config.projection_dim)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the processor's output, found by running it once on a blank image."""
        out = self.processor(images=Image.new("RGB", (64, 48)), return_tensors="np")["pixel_values"]
        return tuple(int(x) for x in np.asarray(out).shape[1:])  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """The model part of a cache request: identity, revision, weights, preprocessing, output."""
        # A local directory is named by its folder (its path differs per machine; the revision identifies it).
        name = Path(self.source).name if self.local else self.model
        return {"model": name, "revision": self.revision,
                "weights": f"random-init (untrained, seed {self.seed})" if self.random_init else "pretrained",
                "architecture": {"model_type": self.config.model_type, "image_size": self.config.image_size,
                                 "patch_size": self.config.patch_size, "hidden_size": self.config.hidden_size,
                                 "layers": self.config.num_hidden_layers, "projection_dim": self.dim},
                "preprocessing": preprocessing_summary(self.processor),
                "decoding": self.decoding.describe(),
                "embedding": "CLIP visual projection, L2-normalised, stored float16"}


def resolve_clip(model: str, *, local_files_only: bool | None = None, random_init: bool = False,
                 seed: int = 0, max_image_pixels: int | None = None, background: str | None = None,
                 preprocess: str = "reference") -> ClipSpec:
    """Config, image processor and revision of a CLIP checkpoint (hub id or directory); no weights yet.
    ``max_image_pixels`` and ``background`` (None: the defaults) set how image files are decoded
    (:class:`ImageDecoding`); ``preprocess`` what computes the pixels (:func:`pixel_rule`)."""
    from transformers import AutoConfig, AutoImageProcessor

    model = str(model)
    config = _from_pretrained(AutoConfig, model, local_files_only)
    if config.model_type == "clip":
        # The projection size lives on the top-level config; the vision sub-config's default (512) may differ.
        full, config = config, config.vision_config
        config.projection_dim = full.projection_dim
    elif config.model_type != "clip_vision_model":
        raise ModelLoadError(f"{model}: a {config.model_type!r} checkpoint; cfrh extracts image features with "
                             f"CLIP checkpoints (e.g. openai/clip-vit-base-patch32)")
    processor = _from_pretrained(AutoImageProcessor, model, local_files_only)
    local = _looks_like_path(model)
    source = str(Path(model).expanduser().resolve()) if local else model
    if random_init:
        revision = _hub_commit(model) if not local else None
        revision = f"config {revision}" if revision else "config only"
    else:
        revision = _weights_digest(Path(source)) if local else _hub_commit(model)
        if local and revision is None:
            raise ModelLoadError(f"{source}: no weights here ({' / '.join(_WEIGHT_FILES[::2])}); save a "
                                 f"checkpoint with save_pretrained, or use random_init = true for an untrained "
                                 f"model (benchmarks only)")
    spec = ClipSpec(model=model, source=source, config=config, processor=processor, revision=revision,
                    random_init=random_init, seed=seed, local_files_only=local_files_only, local=local)
    spec.decoding = ImageDecoding.for_edge(max(spec.pixel_shape[1:]), max_image_pixels, background)
    spec.pixels = pixel_rule(processor, preprocess)
    return spec


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` is the GPU when one is present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but torch sees no GPU; use --device cpu")
    return dev


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``auto`` is fp16 on a GPU and fp32 on the CPU; int8 (dynamic quantisation) exists on the CPU only."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise ModelLoadError("precision int8 (dynamic quantisation) runs on the CPU only; use --device cpu "
                             "or fp16/bf16 on the GPU")
    return precision


def image_embeddings(output: Any) -> torch.Tensor:
    """The projected image embeddings from any CLIP image call: a tensor (transformers 4.x
    ``get_image_features``), a ModelOutput with ``image_embeds`` (``CLIPVisionModelWithProjection``), or one
    whose ``pooler_output`` holds the projection (transformers 5.x ``get_image_features``)."""
    if isinstance(output, torch.Tensor):
        return output
    embeds = getattr(output, "image_embeds", None)
    if embeds is None:
        embeds = getattr(output, "pooler_output", None)
    if embeds is None:
        raise TypeError(f"no image embeddings in a {type(output).__name__}")
    return embeds


@dataclass
class ClipImageEncoder:
    """A loaded CLIP image tower on one device, in one precision."""

    spec: ClipSpec
    model: torch.nn.Module
    device: torch.device
    precision: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def processor(self) -> Any:
        return self.spec.processor

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Model input for decoded images, as extraction computes it from the files: the model's own processor's
        (B, 3, H, W) float32 pixels from :func:`to_rgb`'s images, or with the fast rule its (B, H, W, 3) uint8
        crops (:meth:`embed` takes either)."""
        rgb = [to_rgb(im, self.spec.decoding) for im in images]
        if self.spec.pixels is not None:
            return torch.from_numpy(np.stack([self.spec.pixels.crop(im) for im in rgb]))
        return torch.from_numpy(np.asarray(self.processor(images=rgb, return_tensors="np")["pixel_values"],
                                           dtype=np.float32))

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Model input → (B, D) float32 L2-normalised embeddings on the CPU. The input is the processor's float
        pixels, or the fast rule's uint8 crops, which are moved to the device as they are (a quarter of the
        bytes) and normalised there."""
        with torch.inference_mode():
            if pixel_values.dtype == torch.uint8:
                if self.spec.pixels is None:
                    raise ValueError("uint8 crops need the fast pixel rule (features.preprocess = \"fast\")")
                pixel_values = self.spec.pixels.normalise(pixel_values.to(self.device, non_blocking=True))
            pv = pixel_values.to(self.device, _DTYPES[self.precision], non_blocking=True)
            if hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=pv)
            else:
                out = self.model(pixel_values=pv)
            return F.normalize(image_embeddings(out).float(), dim=-1).cpu()

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images → (B, D) float16 embeddings, the same values extraction stores."""
        return self.embed(self.preprocess(images)).numpy().astype(np.float16)


def load_clip(model: str | ClipSpec, device: str | torch.device | None = "auto", precision: str | None = "auto",
              *, local_files_only: bool | None = None, random_init: bool = False, seed: int = 0) -> ClipImageEncoder:
    """Load a CLIP image tower for feature extraction.

    ``model``: a hub id (e.g. ``openai/clip-vit-base-patch32``), a local checkpoint directory, or a
    :class:`ClipSpec` from :func:`resolve_clip`. ``precision``: auto | fp32 | fp16 | bf16 | int8 (dynamic
    quantisation of the Linear layers, CPU). ``random_init`` builds the architecture with seeded random
    weights (untrained; flagged as such). Hub ids are looked up in the local HF cache first and fetched
    only when not offline (``local_files_only`` or ``HF_HUB_OFFLINE=1``).
    """
    from transformers import CLIPVisionModelWithProjection

    spec = model if isinstance(model, ClipSpec) else resolve_clip(
        model, local_files_only=local_files_only, random_init=random_init, seed=seed)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if spec.random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            net = CLIPVisionModelWithProjection(spec.config)
    else:
        net, loading = _from_pretrained(CLIPVisionModelWithProjection, spec.source, spec.local_files_only,
                                        config=spec.config, output_loading_info=True)
        if loading.get("missing_keys"):
            missing = sorted(loading["missing_keys"])
            raise ModelLoadError(f"{spec.model}: checkpoint lacks {len(missing)} image-tower weights "
                                 f"(e.g. {missing[0]}); it is not a complete CLIP checkpoint")
    net = net.eval().requires_grad_(False)
    info: dict[str, Any] = {"device": str(dev), "precision": prec, "quantization": QUANTIZATION.get(prec)}
    if prec == "int8":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
    else:
        net = net.to(dev, _DTYPES[prec])
    return ClipImageEncoder(spec=spec, model=net, device=dev, precision=prec, info=info)


# -- decoding in DataLoader workers -------------------------------------------------------------
class ImageBatches(torch.utils.data.Dataset):
    """Item k decodes and preprocesses the k-th batch of images, so workers overlap the model.

    Returns ``(rows, pixels, errors)``: ``errors[i]`` is "" for a good image, else why it failed
    (its pixels are zeros and must not be used). ``sources`` are file paths or :class:`ImageMember` objects (a
    batch's members are read together). Images are decoded one at a time (``decoding``: default, the
    default rule at the processor's edge), so a batch of huge files holds one decoded file at a time.
    With a fast ``pixels`` rule the pixels are its (B, H, W, 3) uint8 crops (:func:`decode_pixels`), else
    the processor's (B, 3, H, W) float32 output. Holds no Zarr object, so it pickles into spawned workers.
    """

    def __init__(self, sources: Sequence[str | os.PathLike | ImageMember], batches: Sequence[np.ndarray],
                 processor: Any, pixel_shape: tuple[int, int, int], decoding: ImageDecoding | None = None,
                 pixels: PixelRule | None = None):
        self.sources = [s if isinstance(s, ImageMember) else str(s) for s in sources]
        self.batches = [np.asarray(b, dtype=np.int64) for b in batches]
        self.processor = processor
        self.pixel_shape = tuple(pixel_shape)
        self.decoding = decoding or ImageDecoding.for_edge(max(self.pixel_shape[1:]))
        self.rule = pixels

    def __len__(self) -> int:
        return len(self.batches)

    def _pixels(self, images: list[Image.Image]) -> np.ndarray:
        return np.asarray(self.processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)

    def __getitem__(self, k: int) -> tuple[np.ndarray, torch.Tensor, list[str]]:
        rows = self.batches[k]
        sources = _fetched([self.sources[row] for row in rows.tolist()])
        if self.rule is not None:
            return self._fast(rows, sources)
        pixels = np.zeros((len(rows), *self.pixel_shape), dtype=np.float32)
        errors = [""] * len(rows)
        images, good = [], []
        for i, source in enumerate(sources):
            try:
                images.append(decode_image(source, self.decoding))
                good.append(i)
            except Exception as err:  # noqa: BLE001 - any decode failure is a counted drop
                errors[i] = _decode_failure(err)
        if images:
            try:
                pixels[good] = self._pixels(images)
            except Exception:  # noqa: BLE001 - isolate the image the processor rejects
                for i, im in zip(good, images):
                    try:
                        pixels[i] = self._pixels([im])[0]
                    except Exception as err:  # noqa: BLE001
                        errors[i] = f"image preprocessing failed: {type(err).__name__}"
        return rows, torch.from_numpy(pixels), errors

    def _fast(self, rows: np.ndarray, sources: list[Any]) -> tuple[np.ndarray, torch.Tensor, list[str]]:
        """The fast rule's uint8 crops, written straight into the batch array."""
        assert self.rule is not None
        crops = np.zeros((len(rows), *self.rule.size, 3), dtype=np.uint8)
        errors = [""] * len(rows)
        for i, source in enumerate(sources):
            try:
                crops[i] = decode_pixels(source, self.decoding, self.rule)
            except Exception as err:  # noqa: BLE001 - any decode failure is a counted drop
                errors[i] = _decode_failure(err)
        return rows, torch.from_numpy(crops), errors


def _decode_failure(err: BaseException) -> str:
    """The drop reason of an image that does not decode (one wording per cause, so the report counts them)."""
    return err.reason if isinstance(err, ImageRejected) else f"image decode failed: {type(err).__name__}"


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetch:
    """Iterate ``iterable`` in a background thread, at most ``depth`` items ahead, so that decoding overlaps
    the model even without worker processes (PIL's decoders and resampling and numpy release the GIL).
    The thread starts at once (it decodes while the weights load); errors are re-raised to the consumer;
    :meth:`close` stops it and lets go of the iterable (a DataLoader iterator then shuts its workers down)."""

    _END = object()

    def __init__(self, iterable: Iterable[Any], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._iterable: Iterable[Any] | None = iterable
        self._thread = threading.Thread(target=self._run, name="cfrh-image-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._iterable or ():
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(_Failed(err))

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(self._END)  # stays exhausted
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        close = getattr(self._iterable, "close", None)   # a generator (decoding threads): shut its pool down now
        if close is not None:
            close()
        self._iterable = None


def image_loader(dataset: ImageBatches, workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ImageBatches` (one item = one batch), in order. Workers are spawned,
    not forked: Zarr's asyncio thread and a forked child do not mix."""
    kwargs: dict[str, Any] = {}
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if workers > 0 and main_file and not os.path.exists(main_file) and getattr(main, "__spec__", None) is None:
        # A script read from stdin cannot be re-imported by a spawned worker: decode in this process.
        log.warning("decoding images in the main process: workers cannot be spawned from %s", main_file)
        workers = 0
    if workers > 0:
        kwargs = {"multiprocessing_context": "spawn", "prefetch_factor": 2}
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory, **kwargs)


def decode_threads(device: torch.device) -> int:
    """Threads decoding beside the model when no worker processes do (a Dask worker cannot spawn them): on a GPU
    the host feeds the model, so every core this process's share of the machine has but one (the GPUs of the
    machine split its cores, at most 16 each); on the CPU one (decoding runs between model calls there)."""
    if device.type != "cuda":
        return 1
    share = (os.cpu_count() or 2) // max(1, torch.cuda.device_count())
    return max(1, min(16, share - 1))


def _in_threads(data: "ImageBatches", threads: int, pin_memory: bool = False
                ) -> Iterator[tuple[np.ndarray, torch.Tensor, list[str]]]:
    """The batches of ``data`` decoded by ``threads`` threads, two batches per thread in flight, in order
    (Pillow's decoders and resampling, torch's resize and numpy copies release the GIL); ``pin_memory``: each
    batch's pixels in page-locked memory, for a non-blocking copy to the GPU."""
    def decode(k: int) -> tuple[np.ndarray, torch.Tensor, list[str]]:
        rows, pixels, errors = data[k]
        return rows, (pixels.pin_memory() if pin_memory else pixels), errors

    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="cfrh-decode") as pool:
        items = iter(range(len(data)))
        pending = collections.deque(pool.submit(decode, k) for k in itertools.islice(items, 2 * threads))
        try:
            while pending:
                batch = pending.popleft().result()
                k = next(items, None)
                if k is not None:
                    pending.append(pool.submit(decode, k))
                yield batch
        finally:
            for future in pending:
                future.cancel()


def start_decoding(spec: ClipSpec, sources: Sequence[str | os.PathLike | ImageMember], batches: Sequence[np.ndarray],
                   workers: int = 0, pin_memory: bool = False, overlap: bool = True,
                   threads: int = 1) -> Prefetch | "Inline":
    """Begin decoding and preprocessing ``batches`` (row-index arrays into ``sources``) ahead of the model:
    in ``workers`` spawned processes, or when 0 in the prefetch thread (``threads`` > 1: a pool of that many
    threads behind it, :func:`decode_threads`). Call it before loading the weights so the first batches are
    ready when the model is; close the result when done.

    ``overlap=False`` with no workers decodes each batch in the consuming thread, when it is asked for
    (:func:`decoding_overlaps` says when that is faster)."""
    data = ImageBatches(sources, batches, spec.processor, spec.pixel_shape, spec.decoding, spec.pixels)
    if workers == 0 and not overlap:
        return Inline(data)
    if workers == 0 and threads > 1:
        return Prefetch(_in_threads(data, threads, pin_memory), depth=2 * threads)
    return Prefetch(iter(image_loader(data, workers, pin_memory=pin_memory)))


class Inline:
    """The batches of an :class:`ImageBatches`, decoded in the consuming thread between model calls (no
    prefetch thread): what :func:`start_decoding` gives when overlapping would cost more than it hides."""

    def __init__(self, data: ImageBatches):
        self._items = iter(range(len(data)))
        self._data: ImageBatches | None = data

    def __iter__(self) -> "Inline":
        return self

    def __next__(self) -> tuple[np.ndarray, torch.Tensor, list[str]]:
        if self._data is None:
            raise StopIteration
        return self._data[next(self._items)]

    def close(self) -> None:
        self._data = None


def embed_decoded(encoder: ClipImageEncoder, decoded: Iterable[tuple[Any, torch.Tensor, list[str]]],
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per decoded batch: (rows int64, float16 unit embeddings with failed rows zeroed, reasons as an
    object array: "" for a good row, else why it failed — decoding, preprocessing, or a non-finite
    embedding). The one loop extraction and encoding share, so a failed image never yields a row."""
    for rows, pixels, errors in decoded:
        rows = np.asarray(rows, dtype=np.int64)  # the DataLoader hands numpy arrays back as tensors
        emb = encoder.embed(pixels).numpy()
        reasons = np.asarray(errors, dtype=object)
        reasons[(reasons == "") & ~np.isfinite(emb).all(axis=1)] = "image embedding not finite"
        emb[reasons != ""] = 0.0
        yield rows, emb.astype(np.float16), reasons


def decoding_overlaps(device: torch.device) -> bool:
    """Whether images should be decoded in a thread beside the model (True) or between its calls (False).

    On a GPU the model waits on the host, so decoding beside it is free. On the CPU the model's intra-op
    threads already hold every core, and a decoding thread beside them costs more than it hides: each time
    it runs, one of the model's OpenMP threads is preempted and the others spin at the next barrier (and it
    takes the GIL between the model's operator calls), while decoding between calls costs exactly its own
    time, which the fast pixel rule makes ~2-3% of a ViT-B/32 forward pass. On this project's shared 2-core
    machine the two measured within noise of each other (6.33 vs 6.07 and 5.97 vs 6.28 images/s under a load
    average of 4.5), so the choice rests on the reasoning; ``benchmarks/extract.py`` splits the loop's time."""
    return device.type != "cpu"

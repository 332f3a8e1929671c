"""Peak memory of extracting very large images: four 12,000 × 12,000 RGB PNGs in one batch against four
small ones, through the product path (``cfrh.extraction.extract``: folder reader → decoding → CLIP image
tower → cache) with the real ViT-B/32 architecture (config and processor from
../shared/models/clip-vit-base-patch32, random weights; transformers' CLIP defaults, which are
ViT-B/32, where ../shared is absent), on the CPU, one batch of four, no worker processes.

Each extraction runs in a fresh subprocess that reports its own peak resident memory
(``ru_maxrss``), so the two figures share every fixed cost (Python, torch, the model) and their
difference is what the large images cost. Loading the model's weights can set both peaks, hiding
the decoding, so the decoding alone is measured the same way too: one batch of the four images
through ``ImageBatches`` (decode + processor, as extraction's decoder runs it), small against large.

A 12,000 × 12,000 RGB image decoded whole is 576 MB in Pillow (4 bytes a pixel), 2.3 GB for four;
decoded in strips and reduced as it is decoded (``cfrh.features.image.decode_image``), it should cost
a few tens of MB. With ``--full-decode`` the script also measures the old way for comparison (each
image of the batch decoded whole and kept for the processor, ``Image.open(path).convert("RGB")``).

    python benchmarks/large_images.py [--full-decode] [--keep DIR]

Last line: ``large_images_extra_rss_gb: <peak with the large images − peak with the small ones>``
(target ≤ 0.5).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG, SMALL, N_IMAGES = 12_000, 640, 4


def make_collection(folder: Path, size: int) -> Path:
    """``folder/images/{0..3}.png`` (an RGB gradient of ``size`` × ``size``; copies of one file, so making them
    takes one encode) and ``captions.csv``."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    ramp = Image.linear_gradient("L").resize((size, size))
    first = folder / "images" / "0.png"
    Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), Image.new("L", (size, size), 90))).save(
        first, compress_level=1)
    for i in range(1, N_IMAGES):
        shutil.copyfile(first, folder / "images" / f"{i}.png")
    (folder / "captions.csv").write_text("image,text\n" + "".join(f"images/{i}.png,picture {i}\n"
                                                                  for i in range(N_IMAGES)))
    return folder


def extract_child(folder: Path, cache: Path) -> dict:
    """Extract ``folder`` in this process; what it did and this process's peak memory."""
    from cfrh.config import Pipeline
    from cfrh.demo import vit_b32_config_dir
    from cfrh.extraction import extract

    model = vit_b32_config_dir(cache)
    pipeline = Pipeline(name=folder.name, path=None, dataset={"reader": "folder", "root": str(folder)},
                        features={"image_model": str(Path(model).resolve()), "random_init": True,
                                  "local_files_only": True, "device": "cpu", "batch_size": N_IMAGES, "workers": 0},
                        split={"method": "random", "query": 1, "train": "all", "database": "rest", "seed": 0})
    t0 = time.perf_counter()
    result = extract(pipeline, cache)
    return {"items": result.counts["items"], "dropped": result.dropped.get("by_reason", {}),
            "seconds": round(time.perf_counter() - t0, 1), "model": str(model)}


def batch_child(folder: Path, cache: Path) -> dict:
    """Decoding alone: one ``ImageBatches`` item (every image of the batch decoded, then the processor)."""
    import numpy as np

    from cfrh.demo import vit_b32_config_dir
    from cfrh.features.image import ImageBatches, resolve_clip

    spec = resolve_clip(str(Path(vit_b32_config_dir(cache)).resolve()), local_files_only=True, random_init=True)
    paths = sorted((folder / "images").glob("*.png"))
    t0 = time.perf_counter()
    _, pixels, errors = ImageBatches(paths, [np.arange(len(paths))], spec.processor, spec.pixel_shape,
                                     spec.decoding)[0]
    return {"items": len(pixels), "failed": sum(bool(e) for e in errors), "seconds": round(time.perf_counter() - t0, 1)}


def full_decode_child(folder: Path, cache: Path) -> dict:
    """The old decoding, for comparison: every image of the batch decoded whole, then the processor."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from cfrh.demo import vit_b32_config_dir

    Image.MAX_IMAGE_PIXELS = None
    processor = AutoImageProcessor.from_pretrained(str(vit_b32_config_dir(cache)), local_files_only=True)
    t0 = time.perf_counter()
    images = []
    for path in sorted((folder / "images").glob("*.png")):
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    pixels = processor(images=images, return_tensors="np")["pixel_values"]
    return {"items": len(pixels), "seconds": round(time.perf_counter() - t0, 1)}


def measure(mode: str, folder: Path, cache: Path) -> dict:
    """Run ``mode`` on ``folder`` in a fresh interpreter; its report with ``peak_rss_gb``."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), str(cache)], check=True,
                         capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


CHILDREN = {"extract": extract_child, "batch": batch_child, "full": full_decode_child}


def child(mode: str, folder: str, cache: str) -> None:
    report = CHILDREN[mode](Path(folder), Path(cache))
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9, 3)
    print(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full-decode", action="store_true", help="also measure the old whole-image decoding")
    ap.add_argument("--keep", type=Path, default=None, help="make (or reuse) the images here instead of a temp dir")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="cfrh-large-") as tmp:
        root = args.keep or Path(tmp)
        folders = {}
        for name, size in (("small", SMALL), ("large", BIG)):
            folders[name] = root / name
            if not (root / name / "captions.csv").is_file():
                t0 = time.perf_counter()
                make_collection(root / name, size)
                print(f"made {N_IMAGES} {size} × {size} PNGs in {time.perf_counter() - t0:.1f} s", flush=True)
        runs = {name: measure("extract", folder, Path(tmp) / f"cache-{name}") for name, folder in folders.items()}
        for name, r in runs.items():
            print(f"extract, {N_IMAGES} {name} images in one batch: peak RSS {r['peak_rss_gb']:.3f} GB "
                  f"({r['items']} items, dropped {r['dropped'] or 'none'}, {r['seconds']} s; model {r['model']})")
        batch = {name: measure("batch", folder, Path(tmp) / f"cache-{name}") for name, folder in folders.items()}
        for name, r in batch.items():
            print(f"decoding alone (decode + processor), one batch of {N_IMAGES} {name} images: peak RSS "
                  f"{r['peak_rss_gb']:.3f} GB ({r['seconds']} s, {r['failed']} failed)")
        decoding = batch["large"]["peak_rss_gb"] - batch["small"]["peak_rss_gb"]
        print(f"decoding alone, large − small: {decoding:.3f} GB")
        if args.full_decode:
            old = measure("full", folders["large"], Path(tmp) / "cache-full")
            print(f"old decoding (whole images, then the processor), {N_IMAGES} large images: peak RSS "
                  f"{old['peak_rss_gb']:.3f} GB ({old['seconds']} s, decoding and processor only)")
        extra = runs["large"]["peak_rss_gb"] - runs["small"]["peak_rss_gb"]
        print(f"large_images_extra_rss_gb: {extra:.3f}")


if __name__ == "__main__":
    main()

"""The webdataset reader on generated img2dataset-style shards: brace patterns, keys as ids, counted drops
(a sample without caption, one without image, a corrupt image at extraction, a missing shard), images read
in place by byte range, an fsspec URL root, and shards on Dask tasks giving the single-process arrays."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from cfrh.config import load_pipeline
from cfrh.datasets.base import DatasetError, read_dataset
from cfrh.datasets.webdataset import expand_braces
from cfrh.extraction import extract
from cfrh.features.image import ImageMember, load_clip, read_members, resolve_clip
from clip_fixtures import make_tiny_clip

CORRUPT = "000000003"     # a .jpg member that is not an image: dropped at extraction
NO_CAPTION = "000000005"  # image and metadata, no .txt: dropped by the reader
NO_IMAGE = "000000011"    # caption only: dropped by the reader


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, n_shards: int = 2, per_shard: int = 7) -> dict[str, bytes]:
    """img2dataset's layout: {key}.jpg, {key}.txt, {key}.json per sample; returns each key's image bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s * per_shard + i:09d}"
                data = b"\xff\xd8 not a jpeg" if key == CORRUPT else _jpeg(int(key), (40 + 3 * i, 30 + 2 * i))
                if key != NO_IMAGE:
                    _add(tar, f"{key}.jpg", data)
                    images[key] = data
                if key != NO_CAPTION:
                    _add(tar, f"{key}.txt", f"a photo number {key} of a {'dog' if i % 2 else 'cat'}".encode())
                meta = {"key": key, "status": "success", "labels": ["dog"] if i % 2 else ["cat", "pet"]}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
    return images


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("wds") / "shards"
    return root, write_shards(root)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


def _pipeline(tmp_path: Path, root: str, model: Path, extra: str = "") -> Path:
    toml = tmp_path / "wds.toml"
    toml.write_text(f"""name = "wds"
[dataset]
reader = "webdataset"
root = "{root}"
shards = "{{00000..00002}}.tar"
{extra}
[features]
image_model = "{model}"
batch_size = 2
block_rows = 4
workers = 0
[split]
method = "random"
query = 2
train = 6
seed = 0
""")
    return toml


def test_brace_patterns_expand_like_webdatasets():
    assert expand_braces("{00000..00002}.tar") == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_braces("train-{a,b}-{8..10}.tar") == ["train-a-8.tar", "train-a-9.tar", "train-a-10.tar",
                                                       "train-b-8.tar", "train-b-9.tar", "train-b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DatasetError, match="runs backwards"):
        expand_braces("{5..1}.tar")


def test_the_reader_indexes_samples_in_place_and_counts_drops(shards):
    root, images = shards
    c = read_dataset("webdataset", root, shards="{00000..00002}.tar")
    kept = [f"{k:09d}" for k in range(14) if f"{k:09d}" not in (NO_CAPTION, NO_IMAGE)]
    assert c.ids == kept                                           # sample keys, in shard order
    assert c.texts[0] == "a photo number 000000000 of a cat" and c.text_kind == "captions"
    assert c.dropped.counts == {"missing shard": 1, "no caption": 1, "no image in the sample": 1}
    assert ["00002.tar", "missing shard"] in c.dropped.to_dict()["items"]
    assert c.label_names == ["cat", "dog", "pet"] and c.labels[:2].tolist() == [[1, 0, 1], [0, 1, 0]]
    members = c.image_paths
    assert all(isinstance(m, ImageMember) for m in members)
    assert members[8].archive == str(root / "00001.tar") and members[8].name == f"{kept[8]}.jpg"
    assert read_members(members) == [images[k] for k in kept]       # byte ranges of the shards, unpacked nowhere
    assert [m.relative_to(str(root)) for m in members[:1]] == ["00000.tar/000000000.jpg"]
    assert sorted(p.name for p in root.iterdir()) == ["00000.tar", "00001.tar"]
    default = read_dataset("webdataset", root)                     # every *.tar of the root
    assert default.ids == c.ids and len(default.dropped) == 2


def test_extraction_from_shards_drops_the_corrupt_image_and_embeds_the_rest(shards, tiny_clip, tmp_path):
    root, images = shards
    result = extract(load_pipeline(_pipeline(tmp_path, str(root), tiny_clip)), tmp_path / "cache")
    cache = result.cache
    reasons = result.dropped["by_reason"]
    assert reasons == {"missing shard": 1, "no caption": 1, "no image in the sample": 1,
                       "image decode failed: UnidentifiedImageError": 1}
    assert [CORRUPT, "image decode failed: UnidentifiedImageError"] in result.dropped["items"]
    ids = cache.strings("ids")
    assert CORRUPT not in ids and len(ids) == 11 and cache.strings("paths")[0] == "00000.tar/000000000.jpg"
    # the same embeddings as the images decoded from their bytes directly
    assert cache.request["image"]["preprocess"] == "fast"
    enc = load_clip(resolve_clip(str(tiny_clip), preprocess="fast"))
    direct = enc.encode([Image.open(io.BytesIO(images[k])) for k in ids])
    np.testing.assert_array_equal(cache.read("image"), direct)


def test_shards_at_an_fsspec_url(shards, tiny_clip, tmp_path):
    root, _ = shards
    url = f"memory://cfrh-wds-{tmp_path.name}/shards"
    fs = fsspec.filesystem("memory")
    for p in root.iterdir():
        fs.pipe(f"{url}/{p.name}", p.read_bytes())
    local = extract(load_pipeline(_pipeline(tmp_path, str(root), tiny_clip)), tmp_path / "local")
    remote = extract(load_pipeline(_pipeline(tmp_path, url, tiny_clip)), tmp_path / "remote")
    assert remote.cache.strings("ids") == local.cache.strings("ids")
    np.testing.assert_array_equal(remote.cache.read("image"), local.cache.read("image"))
    assert remote.cache.strings("paths") == local.cache.strings("paths")


def test_a_url_root_with_a_folder_reader_is_one_line(tiny_clip, tmp_path):
    from cfrh.extraction import ExtractError

    toml = _pipeline(tmp_path, "memory://nowhere/shards", tiny_clip)
    toml.write_text(toml.read_text().replace('reader = "webdataset"', 'reader = "folder"')
                    .replace('shards = "{00000..00002}.tar"\n', ""))
    with pytest.raises(ExtractError, match="reads local folders only"):
        extract(load_pipeline(toml), tmp_path / "cache")


def test_shards_on_dask_tasks_give_the_single_process_arrays(shards, tiny_clip, tmp_path):
    pytest.importorskip("distributed")
    root, _ = shards
    pipe = load_pipeline(_pipeline(tmp_path, str(root), tiny_clip))
    single = extract(pipe, tmp_path / "single").cache
    dask = extract(pipe, tmp_path / "dask", scheduler="local:2")
    assert dask.found["image"]["dask_workers"] == 2
    for name in single.data_arrays():
        np.testing.assert_array_equal(dask.cache.read(name), single.read(name), err_msg=name)
    assert dask.cache.fingerprint == single.fingerprint

"""`cfrh serve`: the search service and its HTTP API, in process (Starlette's TestClient), on the small
cache of tests/test_search.py (tiny random CLIP, real extract and train, runs under a tmp runs root), and
on the real WIKI release (precomputed features: search by id only, no images)."""
from __future__ import annotations

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from starlette.testclient import TestClient

from cfrh.cache import open_pipeline_cache
from cfrh.cli import cli
from cfrh.cli.serve import is_loopback
from cfrh.config import load_pipeline
from cfrh.encode import CodeEncoder
from cfrh.extraction import extract
from cfrh.runs import open_run
from cfrh.serve import SearchService, images_root
from cfrh.serve.app import LOOPBACK_HOSTS, content_security_policy, create_app, page_html
from cfrh.training import train
from clip_fixtures import make_tiny_clip
from test_search import brute, built, stored  # noqa: F401  (built: the module-scoped trained cache)

BITS = 32
RESULT_FIELDS = {"id", "distance", "rank", "text", "labels", "image_url"}


@pytest.fixture(scope="module")
def service(built):
    """The service over the built cache's 32-bit codes, warmed up as `cfrh serve` does."""
    svc = SearchService(built["cache_obj"], built["store"], BITS,
                        images=images_root(built["cache_obj"], built["pipe"]))
    svc.warm_up()
    return svc


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def png_bytes(path) -> bytes:
    return path.read_bytes()


def assert_error(response, status: int, match: str) -> None:
    """A JSON error with the status and a one-line message containing ``match``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert match in message and "\n" not in message


def expected(built, query: np.ndarray, modality: str, k: int, skip: int | None = None) -> tuple[list, list]:
    """(ids, distances) of the brute-force top k database items of ``modality`` (ties by row)."""
    cache = built["cache_obj"]
    rows, dist = brute(query, cache, stored(built, BITS, modality), k + (skip is not None))
    keep = [(r, d) for r, d in zip(rows.tolist(), dist.tolist()) if r != skip][:k]
    ids = cache.strings("ids")
    return [ids[r] for r, _ in keep], [d for _, d in keep]


def test_healthz_info_and_the_page(client, built):
    assert client.get("/healthz").json() == {"ok": True, "pipeline": "searchtest", "bits": BITS, "items": 48}
    info = client.get("/api/info").json()
    assert info["queries"] == {"image": True, "text": True} and info["images"] and info["labels"]
    assert info["database"] == len(built["cache_obj"].split("database")) and info["bits"] == BITS
    assert info["examples"][0] == built["cache_obj"].strings("ids")[int(built["cache_obj"].split("query")[0])]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="q"' in page.text and 'id="results"' in page.text
    # No external assets: nothing is loaded from another origin, and the CSP forbids it anyway.
    assert "http://" not in page.text and "https://" not in page.text
    csp = page.headers["content-security-policy"]
    assert csp == content_security_policy(page_html()) and "default-src 'none'" in csp and "'sha256-" in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"


def test_text_search_finds_the_brute_force_images(client, built):
    r = client.get("/api/search", params={"text": "red dog", "k": 7})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["target"] == "image" and doc["query"]["text"] == "red dog"
    code = CodeEncoder(built["cache_obj"], built["store"], BITS).encode_texts(["red dog"]).codes
    assert doc["query"]["code"] == code[0].tobytes().hex()
    ids, dist = expected(built, code, "image", 7)
    assert [h["id"] for h in doc["results"]] == ids and [h["distance"] for h in doc["results"]] == dist
    assert [h["rank"] for h in doc["results"]] == list(range(1, 8))
    cache = built["cache_obj"]
    row = cache.strings("ids").index(ids[0])
    first = doc["results"][0]
    assert set(first) == RESULT_FIELDS
    assert first["text"] == cache.strings("texts")[row]
    assert first["labels"] == [cache.strings("label_names")[j] for j in np.flatnonzero(cache.read("labels")[row])]
    assert first["image_url"] == "/images/" + ids[0].replace("/", "%2F")


@pytest.mark.parametrize("modality", ["image", "text"])
def test_item_search_finds_both_modalities(client, built, modality):
    cache = built["cache_obj"]
    row = int(cache.split("query")[0])
    item_id = cache.strings("ids")[row]
    doc = client.get("/api/search", params={"id": item_id, "modality": modality, "k": 5}).json()
    code = stored(built, BITS, modality)[[row]]
    target = "text" if modality == "image" else "image"
    assert doc["target"] == target and doc["query"]["id"] == item_id and doc["query"]["modality"] == modality
    assert doc["query"]["code"] == code[0].tobytes().hex() and doc["query"]["item"]["id"] == item_id
    assert ([h["id"] for h in doc["results"]], [h["distance"] for h in doc["results"]]) == \
        expected(built, code, target, 5)
    same = doc["same_modality"]
    assert ([h["id"] for h in same], [h["distance"] for h in same]) == expected(built, code, modality, 5, skip=row)


def test_uploaded_image_finds_texts(client, built):
    cache = built["cache_obj"]
    data = png_bytes(built["root"] / "images" / "004.png")
    row = cache.strings("paths").index("images/004.png")
    code = stored(built, BITS, "image")[[row]]  # the image is in the cache: the same code
    r = client.post("/api/search", files={"image": ("004.png", data, "image/png")}, data={"k": "6"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["target"] == "text" and doc["query"] == {"image": "004.png", "code": code[0].tobytes().hex(),
                                                         "bits": BITS}
    assert [h["id"] for h in doc["results"]] == expected(built, code, "text", 6)[0]
    raw = client.post("/api/search?k=6", content=data, headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["results"] == doc["results"]


def test_items_and_thumbnails(client, service, built):
    item = client.get("/api/items/images/004.png")  # ids of the folder reader are paths: slashes work as is
    assert item.status_code == 200
    assert client.get("/api/items/images%2F004.png").json() == item.json()
    doc = item.json()
    assert doc["id"] == "images/004.png" and doc["image_url"] == "/images/images%2F004.png"
    assert doc["labels"] == [json.loads(line)["labels"] for line in
                             (built["root"] / "captions.jsonl").read_text().splitlines()][4:5]
    thumb = client.get(doc["image_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert im.format == "JPEG" and max(im.size) <= 256
    cached = service.thumbnails.size
    assert cached > 0 and client.get(doc["image_url"]).content == thumb.content
    assert service.thumbnails.size == cached  # the second request was answered from memory


@pytest.mark.parametrize("method, url, kwargs, status, match", [
    ("get", "/api/search?id=nope", {}, 404, "no item with id 'nope'"),
    ("get", "/api/items/nope", {}, 404, "no item with id"),
    ("get", "/images/nope", {}, 404, "no item with id"),
    ("get", "/api/search?text=%20%20", {}, 400, "empty text"),
    ("get", "/api/search?text=zebra+giraffe", {}, 400, "no word of 'zebra giraffe'"),
    ("get", "/api/search?text=red&id=images/000.png", {}, 400, "give one query"),
    ("get", "/api/search", {}, 400, "give one query"),
    ("get", "/api/search?text=red&k=0", {}, 400, "k must be an integer from 1 to 1000"),
    ("get", "/api/search?text=red&k=ten", {}, 400, "k must be an integer"),
    ("get", "/api/search?text=red&k=5000", {}, 400, "k must be an integer"),
    ("get", "/api/search?id=images/000.png&modality=audio", {}, 400, "modality must be 'image' or 'text'"),
    ("get", "/api/search?text=" + "red+" * 600, {}, 400, "at most 2,000"),
    ("post", "/api/search", {"files": {"image": ("x.jpg", b"\x00 not an image", "image/jpeg")}}, 415, "not an image"),
    ("post", "/api/search", {"content": b"GIF89a broken", "headers": {"content-type": "image/gif"}}, 415,
     "not an image"),
    ("post", "/api/search", {"files": {"image": ("x.png", b"", "image/png")}}, 400, "empty upload"),
    ("post", "/api/search", {"data": {"k": "3"}, "files": {"other": ("a.txt", b"hello", "text/plain")}}, 415,
     "not an image"),
    ("post", "/api/search", {"content": b"{}", "headers": {"content-type": "application/json"}}, 400,
     "POST an image as multipart/form-data"),
    ("post", "/api/search?text=red", {"content": b"x", "headers": {"content-type": "text/plain"}}, 400,
     "POST an image"),
    ("delete", "/api/search", {}, 405, "DELETE is not allowed"),
    ("get", "/api/nothing", {}, 404, "not found: /api/nothing"),
])
def test_errors_are_one_line_json(client, method, url, kwargs, status, match):
    assert_error(getattr(client, method)(url, **kwargs), status, match)


def test_upload_size_limit(client, service, built, monkeypatch):
    monkeypatch.setattr(service, "max_upload", 8192)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(big, "PNG")
    assert_error(client.post("/api/search", files={"image": ("big.png", big.getvalue(), "image/png")}), 413,
                 f"big.png: {len(big.getvalue()):,} bytes; uploads are limited to 8,192 bytes")
    padded = big.getvalue() + b"\0" * (80 * 1024)  # well past the limit and the multipart slack
    assert_error(client.post("/api/search", files={"image": ("big.png", padded, "image/png")}), 413, "limited to")
    assert_error(client.post("/api/search", content=big.getvalue(), headers={"content-type": "image/png"}), 413,
                 "limited to 8,192 bytes")

    def chunks():  # no content-length: refused while streaming, not after reading everything
        for _ in range(20):
            yield b"\x89PNG" + b"\0" * 1020
    assert_error(client.post("/api/search", content=chunks(), headers={"content-type": "image/png"}), 413,
                 "limited to")
    small = png_bytes(built["root"] / "images" / "000.png")
    assert len(small) < 8192
    assert client.post("/api/search", files={"image": ("s.png", small, "image/png")}).status_code == 200


@pytest.mark.parametrize("url", ["/images/..%2F..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd",
                                 "/images/../../etc/passwd", "/images/images%2F..%2F..%2Fcaptions.jsonl",
                                 "/api/items/..%2Fcaptions.jsonl"])
def test_path_like_ids_never_reach_the_filesystem(client, url):
    assert_error(client.get(url), 404, "")


def test_a_stored_path_outside_the_dataset_is_refused(client, service, built, monkeypatch):
    outside = built["base"] / "outside.png"
    outside.write_bytes(png_bytes(built["root"] / "images" / "001.png"))
    row = service.row("images/002.png")
    for stored_path in ("../outside.png", str(outside)):  # relative escape, and an absolute path
        monkeypatch.setattr(service, "paths", [*service.paths[:row], stored_path, *service.paths[row + 1:]])
        assert_error(client.get("/images/images%2F002.png"), 404, "leaves the dataset folder")


def test_an_image_model_that_cannot_load_turns_image_queries_off(built, tmp_path):
    """A cache's CLIP that is not on this machine (here: another checkpoint) leaves words and ids working."""
    other = make_tiny_clip(tmp_path / "other-clip", seed=1)
    svc = SearchService(built["cache_obj"], built["store"], BITS, image_model=str(other))
    svc.warm_up()
    assert "not the image model" in svc.unavailable["image"]
    with TestClient(create_app(svc)) as c:
        assert c.get("/api/info").json()["queries"] == {"image": False, "text": True}
        upload = {"image": ("004.png", png_bytes(built["root"] / "images" / "004.png"), "image/png")}
        assert_error(c.post("/api/search", files=upload), 400, "new images cannot be hashed here: ")
        assert c.get("/api/search?text=red").status_code == 200


def test_token_is_required_on_every_request(service):
    with TestClient(create_app(service, token="s3cret")) as c:
        for url in ("/", "/healthz", "/api/info", "/api/search?text=red", "/images/images%2F000.png"):
            r = c.get(url)
            assert_error(r, 401, "needs a token")
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert_error(c.get(url, headers={"Authorization": "Bearer wrong"}), 401, "needs a token")
            assert c.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.get(url + ("&" if "?" in url else "?") + "token=s3cret").status_code == 200
        assert_error(c.get("/healthz?token=s3cre"), 401, "needs a token")


def test_only_loopback_host_names_when_bound_to_loopback(service):
    with TestClient(create_app(service, allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/healthz", headers={"host": "[::1]:8000"}).status_code == 200
        assert_error(c.get("/healthz", headers={"host": "evil.example"}), 400, "unexpected Host header")


def test_requests_run_concurrently_with_the_same_answers(service):
    """Many searches at once, through the thread pool, answer exactly as one at a time."""
    words = ["red", "green dog", "blue sky", "red cat", "green tree", "blue car", "red sea", "cat dog"]
    sequential = [service.search_text(w, 5) for w in words]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda w: service.search_text(w, 5), words * 4)) == sequential * 4

    async def many() -> list:
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.get("/api/search", params={"text": w, "k": 5}) for w in words * 3))
    answers = asyncio.run(many())
    assert [r.status_code for r in answers] == [200] * len(answers)
    assert [r.json() for r in answers] == sequential * 3


def test_cli_serves_on_loopback_by_default(built, monkeypatch):
    """The command wires options into the app and uvicorn (uvicorn.run replaced: no socket here)."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    args = ["serve", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--bits", "16"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    app, kw = calls[-1]
    assert (kw["host"], kw["port"]) == ("127.0.0.1", 8000) and "http://127.0.0.1:8000/" in res.output
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").json()["bits"] == 16
        assert c.get("/healthz", headers={"host": "evil.example"}).status_code == 400

    monkeypatch.setenv("CFRH_SERVE_TOKEN", "from-env")
    res = CliRunner().invoke(cli, args + ["--host", "0.0.0.0", "--port", "9001"], catch_exceptions=False)
    assert res.exit_code == 0 and "token required" in res.output and "without a token" not in res.output
    app, kw = calls[-1]
    assert (kw["host"], kw["port"]) == ("0.0.0.0", 9001)
    with TestClient(app, base_url="http://192.0.2.7:9001") as c:  # any Host: it listens on the network
        assert c.get("/healthz").status_code == 401
        assert c.get("/healthz?token=from-env").status_code == 200
    monkeypatch.delenv("CFRH_SERVE_TOKEN")
    res = CliRunner().invoke(cli, args + ["--host", "0.0.0.0"], catch_exceptions=False)
    assert "without a token" in res.output


def test_cli_errors_are_one_line(built):
    res = CliRunner().invoke(cli, ["serve", built["toml"], "--cache", built["cache"], "--runs", built["runs"],
                                   "--bits", "64"])
    assert "has no complete 64-bit" in str(res.exception) and "\n" not in str(res.exception)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("192.168.1.4", False),
                                            ("example.org", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_precomputed_collection_searches_by_id(wiki_dir, tmp_path):
    """WIKI ships its features: no text or image queries, no thumbnails; item ids find texts and labels."""
    cache_root, runs_root = str(tmp_path / "cache"), str(tmp_path / "runs")
    pipe = load_pipeline("wiki", [f"dataset.root='{wiki_dir}'", "train.bits=[16]", "train.epochs=1",
                                  "train.image_hidden=[64]", "train.text_hidden=[64]"])
    extract(pipe, cache_root)
    train(pipe, cache_root, runs_root=runs_root)
    cache = open_pipeline_cache(pipe, cache_root)
    service = SearchService.open(pipe, cache_root, runs_root, bits=16)
    service.warm_up()
    with TestClient(create_app(service)) as c:
        info = c.get("/api/info").json()
        assert info["queries"] == {"image": False, "text": False} and not info["images"]
        assert_error(c.get("/api/search?text=church"), 400, "shipped precomputed")
        assert_error(c.post("/api/search", content=b"\x89PNG", headers={"content-type": "image/png"}), 400,
                     "shipped precomputed")
        item_id = info["examples"][0]
        doc = c.get("/api/search", params={"id": item_id, "modality": "image", "k": 10}).json()
        qrow = cache.strings("ids").index(item_id)
        store = open_run(runs_root, cache, "cfrh")
        rows, dist = brute(store.read_codes(16, "image")[[qrow]], cache, store.read_codes(16, "text"), 10)
        assert [h["id"] for h in doc["results"]] == [cache.strings("ids")[r] for r in rows]
        assert [h["distance"] for h in doc["results"]] == dist.tolist()
        assert all(h["image_url"] is None and len(h["labels"]) == 1 for h in doc["results"])
        assert_error(c.get("/images/" + item_id), 404, "no image file for this item")

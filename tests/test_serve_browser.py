"""The page of `cfrh serve` in a real browser: headless Chromium, driven over the DevTools protocol, opens
``/?q=...`` on a demo-like collection (the demo's generated scenes, a tiny random CLIP) served by a real
``cfrh serve`` process on 127.0.0.1, with a token. The page must show k thumbnails, the same items as the
API, and a click on one must show its neighbours; any JavaScript exception, console error or request to
another origin fails the test. Skipped, saying why, where no Chromium binary is installed."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import pytest

from cfrh.config import load_pipeline
from cfrh.datasets.shapes import generate_shapes
from cfrh.extraction import extract
from cfrh.training import train
from clip_fixtures import make_tiny_clip

pytestmark = pytest.mark.slow
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TOKEN = "browser-test-token"
K = 6
START_S, WAIT_S = 180.0, 30.0  # bounds: a process starting (imports torch on 2 busy cores), a page condition


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), *BROWSERS):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium binary (chromium, chromium-browser, google-chrome, or $CHROMIUM) found: install "
                "Debian's `chromium` package (.ci/run does) to run the browser test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """End a process this test started, and its children (its own session: group id = its pid)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def get_json(url: str, token: str | None = TOKEN) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def serving(pipeline: str, cache: str, runs: str, bits: int, overrides: list[str], log: Path):
    """`cfrh serve` in a process of its own on a free loopback port, with the token; yields its origin."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from cfrh.cli import main; main()", "serve", pipeline, "--cache", cache,
             "--runs", runs, "--bits", str(bits), "--port", str(port), *(f"--set={o}" for o in overrides)],
            env={**os.environ, "CFRH_SERVE_TOKEN": TOKEN}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
        origin = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return get_json(origin + "/healthz")["ok"]
            except OSError:
                return False
        try:
            wait_until(healthy, START_S, f"cfrh serve on {origin} (log: {log})", proc)
            yield origin
        finally:
            stop(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(origin, scenes folder) of `cfrh serve demo` over 60 generated scenes hashed with a tiny CLIP (16 bits)."""
    base = tmp_path_factory.mktemp("serve-browser")
    scenes = generate_shapes(base / "scenes", n=60, size=64)
    clip = make_tiny_clip(base / "clip")
    overrides = [f"dataset.root={json.dumps(str(scenes))}", f"features.image_model={json.dumps(str(clip))}",
                 "features.random_init=false", "features.batch_size=16", "split.query=10", "train.bits=[16]",
                 "train.epochs=3", "train.batch_size=16", "train.image_hidden=[32]", "train.text_hidden=[32]",
                 "train.threads=1"]
    pipe = load_pipeline("demo", overrides)
    cache, runs = str(base / "cache"), str(base / "runs")
    extract(pipe, cache)
    train(pipe, cache, runs_root=runs)
    with serving("demo", cache, runs, 16, overrides, base / "serve.log") as origin:
        yield origin, scenes


class DevTools:
    """A minimal DevTools-protocol client over one page's websocket: commands with bounded waits; events
    (exceptions, console and log entries, requests) are kept for the test to inspect."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=WAIT_S, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + WAIT_S
        while True:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)
            if time.monotonic() > deadline:
                raise AssertionError(f"{method}: no answer within {WAIT_S:.0f} s")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str):
        try:
            return wait_until(lambda: self.evaluate(expression), WAIT_S, what)
        except AssertionError:
            state = self.evaluate("JSON.stringify({status: document.getElementById('status').textContent, "
                                  "cards: document.querySelectorAll('#results .card').length, url: location.href})")
            raise AssertionError(f"{what}: not within {WAIT_S:.0f} s; page state {state}; problems {self.problems()}")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the middle of the element."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            f".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def problems(self) -> list[str]:
        """JavaScript exceptions, console errors and browser log errors (failed loads, CSP violations)."""
        self.evaluate("0")  # a round trip: every event the page raised before it has arrived
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                out.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium's page, as a :class:`DevTools` client."""
    binary = find_chromium()
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking", "--disable-sync",
         "--window-size=1280,1000", "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = None
    try:
        active = profile / "DevToolsActivePort"
        wait_until(lambda: active.is_file() and len(active.read_text().split()) >= 2, START_S,
                   "Chromium's DevTools port", proc)
        port = active.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=WAIT_S) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        client = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Page", "Log", "Network"):
            client.call(f"{domain}.enable")
        yield client
    finally:
        if client is not None:
            client.ws.close()
        stop(proc)


def rendered(browser: DevTools, grid: str) -> list[str]:
    return browser.evaluate(f"[...document.querySelectorAll('#{grid} .card')].map(c => c.dataset.id)")


def shown(grid: str, k: int) -> str:
    """JS: the grid holds k cards and every thumbnail in it has loaded."""
    return (f"(() => {{ const imgs = [...document.querySelectorAll('#{grid} .card img')]; return "
            f"document.querySelectorAll('#{grid} .card').length === {k} && imgs.length === {k} && "
            f"imgs.every(i => i.complete && i.naturalWidth > 0); }})()")


def test_page_shows_k_images_and_a_click_shows_neighbours(server, browser):
    origin, scenes = server
    browser.call("Page.navigate", url=f"{origin}/?q=red+circle&k={K}&token={TOKEN}")
    browser.wait_for(shown("results", K), f"{K} thumbnails for 'red circle'")
    answer = get_json(f"{origin}/api/search?text=red+circle&k={K}")
    assert rendered(browser, "results") == [h["id"] for h in answer["results"]]
    assert "red circle" in browser.evaluate("document.getElementById('status').textContent")
    assert browser.evaluate("document.querySelector('#results .dist').textContent") == \
        f"distance {answer['results'][0]['distance']}"

    clicked = answer["results"][1]["id"]
    browser.click("#results .card:nth-child(2) img")
    browser.wait_for(f"document.body.dataset.shown === '2' && ({shown('results', K)})",
                     f"neighbours of {clicked} after the click")
    neighbours = get_json(f"{origin}/api/search?id={urllib.parse.quote(clicked)}&modality=image&k={K}")
    assert rendered(browser, "results") == [h["id"] for h in neighbours["results"]]
    assert rendered(browser, "same") == [h["id"] for h in neighbours["same_modality"]]
    assert rendered(browser, "query") == [clicked]
    location = urllib.parse.urlsplit(browser.evaluate("location.href"))
    assert urllib.parse.parse_qs(location.query)["id"] == [clicked]

    # Choosing an image file uploads it and shows its nearest texts.
    scene = scenes / "images" / "00003.jpg"
    node = browser.call("DOM.querySelector", nodeId=browser.call("DOM.getDocument")["root"]["nodeId"],
                        selector="#upload")["nodeId"]
    browser.call("DOM.setFileInputFiles", files=[str(scene)], nodeId=node)
    browser.wait_for(f"document.body.dataset.shown === '3' && ({shown('results', K)})", f"texts for {scene.name}")
    uploaded = httpx.post(f"{origin}/api/search", files={"image": (scene.name, scene.read_bytes(), "image/jpeg")},
                          data={"k": str(K)}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=WAIT_S).json()
    assert rendered(browser, "results") == [h["id"] for h in uploaded["results"]]
    assert scene.name in browser.evaluate("document.getElementById('status').textContent")

    assert browser.problems() == []
    assert all(u.startswith(origin + "/") or u.startswith("data:") for u in browser.requested()), \
        browser.requested()


def test_precomputed_collection_page_searches_by_id(wiki_dir, browser, tmp_path):
    """WIKI (shipped features): the box takes an item id; cards show labels, no images, and click through."""
    overrides = [f"dataset.root={json.dumps(str(wiki_dir))}", "train.bits=[16]", "train.epochs=1",
                 "train.image_hidden=[64]", "train.text_hidden=[64]"]
    pipe = load_pipeline("wiki", overrides)
    cache, runs = str(tmp_path / "cache"), str(tmp_path / "runs")
    extract(pipe, cache)
    train(pipe, cache, runs_root=runs)
    with serving("wiki", cache, runs, 16, overrides, tmp_path / "serve.log") as origin:
        first = get_json(f"{origin}/api/info")["examples"][0]
        browser.call("Page.navigate", url=f"{origin}/?q={urllib.parse.quote(first)}&k={K}&token={TOKEN}")
        cards = f"document.querySelectorAll('#results .card .noimg').length === {K}"
        browser.wait_for(cards, f"{K} results for the id {first}")
        answer = get_json(f"{origin}/api/search?id={urllib.parse.quote(first)}&modality=image&k={K}")
        assert rendered(browser, "results") == [h["id"] for h in answer["results"]]
        labels = browser.evaluate("[...document.querySelectorAll('#results .card')].map(c => "
                                  "[...c.querySelectorAll('.labels li')].map(l => l.textContent))")
        assert labels == [h["labels"] for h in answer["results"]] and all(len(x) == 1 for x in labels)
        assert browser.evaluate("document.getElementById('upload-label').hidden") is True
        assert browser.evaluate("document.getElementById('examples').hidden") is False

        clicked = answer["results"][0]["id"]
        browser.click("#results .card:nth-child(1) .noimg")  # a text result: searches with its text code
        browser.wait_for(f"document.body.dataset.shown === '2' && {cards}", f"neighbours of {clicked}")
        neighbours = get_json(f"{origin}/api/search?id={urllib.parse.quote(clicked)}&modality=text&k={K}")
        assert rendered(browser, "results") == [h["id"] for h in neighbours["results"]]
        assert browser.problems() == []

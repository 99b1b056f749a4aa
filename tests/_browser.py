"""Headless Chromium for the report tests, driven over the DevTools protocol on a pipe.

Why the DevTools protocol directly and not Playwright: Playwright for Python is a new
dependency that ships its own Node.js driver (~40 MB) and is tested against the browser build
it downloads itself, which `playwright install` cannot fetch here; what the tests need (open a
file, read the page's state, list what it asked the network for, take a screenshot) is a few
DevTools commands, the same protocol Playwright speaks underneath. With
``--remote-debugging-pipe`` the commands travel over two file descriptors (3: to the browser,
4: from it; JSON messages ending in NUL), so no port is opened and only the standard library
is used.

The browser comes from the system's packages (Debian: ``apt-get install -y chromium``);
``find_browser`` returns None when there is none, and the tests skip saying so.

    python -m tests._browser screenshot REPORT.html OUT.png [--width 1200] [--max-height 2400]
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless, and nothing that reaches out on its own: the machines running the tests have no
# network, and a browser that tries to reach it gets its connections refused.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-pipe")
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")


def find_browser() -> str | None:
    """``$TIMEMOE_BROWSER``, else the first Chromium-family browser on PATH, else None."""
    env = os.environ.get("TIMEMOE_BROWSER")
    if env:
        return env if shutil.which(env) else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def require_browser() -> str:
    """The browser for a test; skips it, saying why, when there is none, or fails it where CI
    asked for one (``TIMEMOE_REQUIRE_BROWSER=1``, set by .ci/run after installing it)."""
    import pytest

    exe = find_browser()
    if exe is None:
        why = "no Chromium-family browser installed (Debian: apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("TIMEMOE_REQUIRE_BROWSER") == "1":
            pytest.fail(why + ", and TIMEMOE_REQUIRE_BROWSER=1")
        pytest.skip(why)
    return exe


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One browser process with a fresh profile; ``call`` sends a command and returns its
    result, keeping the events that arrive meanwhile in ``events``."""

    def __init__(self, executable: str, timeout: float = 60.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="timemoe-chromium-")
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self._stderr = open(Path(self.profile) / "stderr.log", "wb")
        # A small Python trampoline moves the browser's pipe ends to the descriptors
        # --remote-debugging-pipe uses (3 reads, 4 writes) and execs the browser (dash, behind
        # /usr/bin/chromium, takes only one-digit descriptors in its redirections).
        trampoline = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); "
                      "r = os.dup(r) if r == 4 else r; w = os.dup(w) if w == 3 else w; "
                      "os.dup2(r, 3); os.dup2(w, 4); [os.close(fd) for fd in {r, w} - {3, 4}]; "
                      "os.execvp(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-c", trampoline, str(to_browser_r), str(from_browser_w),
                                      executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        try:
            self.version = self.call("Browser.getVersion")["product"]
        except BaseException:  # a browser that does not start leaves no process or profile behind
            self.close()
            raise

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no answer from the browser within {self.timeout:.0f}s; stderr:\n{self.stderr()}")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"the browser closed its pipe (exit {self.proc.poll()}); stderr:\n{self.stderr()}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, session: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["method"] == method and ev.get("sessionId") == session:
                    return self.events.pop(i)["params"]
            msg = self._read_message(deadline)
            if "method" in msg:
                self.events.append(msg)

    def stderr(self) -> str:
        self._stderr.flush()
        return (Path(self.profile) / "stderr.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Page:
    """A page opened from disk with the network switched off, after its load event."""

    browser: Chromium
    session: str
    url: str
    target: str
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    load_seconds: float = 0.0

    def evaluate(self, expression: str) -> Any:
        res = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                     "awaitPromise": True}, self.session)
        if "exceptionDetails" in res:
            raise BrowserError(f"{expression[:80]}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def images(self) -> list[dict[str, Any]]:
        return self.evaluate("Array.from(document.images).map(i => ({src: i.currentSrc.slice(0, 64), alt: i.alt, "
                             "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight, "
                             "shown_width: i.getBoundingClientRect().width}))")

    def console_errors(self) -> list[str]:
        """Error-level console messages, uncaught exceptions and failed loads so far."""
        self.browser.call("Runtime.evaluate", {"expression": "0"}, self.session)  # flush pending events
        out = []
        for ev in self.browser.events:
            if ev.get("sessionId") != self.session:
                continue
            p = ev["params"]
            if ev["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif ev["method"] == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "") + " " +
                           str(p["exceptionDetails"].get("exception", {}).get("description", "")))
            elif ev["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry']['source']}: {p['entry']['text']} {p['entry'].get('url', '')}")
            elif ev["method"] == "Network.loadingFailed":
                out.append(f"load failed: {p.get('errorText')} ({p.get('blockedReason', '')})")
        return out

    def network_requests(self) -> list[str]:
        """URLs the page asked for outside the local file, its data: URIs and about:."""
        return [u for u in self.requests if not u.startswith(LOCAL_SCHEMES)]

    def keyed_values(self) -> dict[str, str]:
        """Text of every element with a ``data-key`` attribute (the reports mark their headline
        numbers so), by key."""
        return self.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('[data-key]'))"
                             ".map(e => [e.dataset.key, e.textContent.trim()]))")

    def layout(self) -> dict[str, float]:
        return self.evaluate("({scroll_width: document.documentElement.scrollWidth, "
                             "viewport_width: window.innerWidth, height: document.documentElement.scrollHeight})")

    def screenshot(self, path: str | Path, max_height: int = 2400) -> Path:
        """PNG of the page from its top, as tall as the page but at most ``max_height`` pixels."""
        size = self.browser.call("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        width, height = int(size["width"]), int(min(size["height"], max_height))
        shot = self.browser.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}, self.session)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        self.browser.call("Target.closeTarget", {"targetId": self.target})


def open_offline(browser: Chromium, path: str | Path, width: int = 1200, height: int = 900) -> Page:
    """Open a file with network access switched off (offline emulation: whatever the page asks
    of the network fails, and is listed in ``Page.requests``); return it after its load event."""
    url = Path(path).resolve().as_uri()
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.call(f"{domain}.enable", session=session)
    browser.call("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                      "uploadThroughput": -1}, session)
    browser.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                        "mobile": False}, session)
    t0 = time.monotonic()
    nav = browser.call("Page.navigate", {"url": url}, session)
    if nav.get("errorText"):
        raise BrowserError(f"{url}: {nav['errorText']}")
    browser.wait_for("Page.loadEventFired", session)
    page = Page(browser, session, url, target, load_seconds=time.monotonic() - t0)
    page.requests = [ev["params"]["request"]["url"] for ev in browser.events
                     if ev["method"] == "Network.requestWillBeSent" and ev.get("sessionId") == session]
    return page


# ---------------------------------------------------------------- what every report must do


def screenshot_dir(tmp_path: Path) -> Path:
    """``$TIMEMOE_SCREENSHOTS`` (e.g. docs/img) or the test's own folder."""
    return Path(os.environ.get("TIMEMOE_SCREENSHOTS") or tmp_path)


def number(text: str) -> float:
    """A number as the reports print it: thousands separators, an optional % sign."""
    text = text.replace(",", "").strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def assert_matches(shown: str, expected: float, key: str) -> None:
    """Equal to the precision shown: an integer exactly, a decimal to its last printed digit."""
    digits = shown.replace(",", "").rstrip("%").split(".")
    places = len(digits[1].split("e")[0]) if len(digits) > 1 else 0
    if shown.endswith("%"):
        places += 2
    tolerance = 0.5 * 10 ** -places if "e" not in shown.lower() else abs(expected) * 5e-3
    assert abs(number(shown) - expected) <= tolerance * (1 + 1e-9), (key, shown, expected)


def check_page(page: Page, min_images: int) -> None:
    """What every report must do in a browser, offline."""
    images = page.images()
    assert len(images) >= min_images, images
    broken = [i for i in images if not i["complete"] or i["width"] == 0 or i["height"] == 0]
    assert not broken, broken
    assert page.console_errors() == []
    assert page.network_requests() == []
    layout = page.layout()
    assert layout["scroll_width"] <= layout["viewport_width"], layout  # nothing wider than the window
    too_wide = [i for i in images if i["shown_width"] > layout["viewport_width"]]
    assert not too_wide, too_wide


def json_value(doc: dict, path: str) -> float:
    """The value at a dotted path of a JSON document (a number indexes a list); a list at the end
    stands for its length."""
    node = doc
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return float(len(node)) if isinstance(node, list) else float(node)


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests._browser")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("screenshot", help="PNG of an HTML file, opened offline")
    s.add_argument("html")
    s.add_argument("png")
    s.add_argument("--width", type=int, default=1200)
    s.add_argument("--max-height", type=int, default=2400)
    args = p.parse_args(argv)
    exe = find_browser()
    if exe is None:
        print("no Chromium-family browser found (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    with Chromium(exe) as browser:
        page = open_offline(browser, args.html, width=args.width)
        page.screenshot(args.png, max_height=args.max_height)
        print(f"{args.png}: {len(page.images())} images, console errors {page.console_errors()}, "
              f"network requests {page.network_requests()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

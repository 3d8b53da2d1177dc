"""A minimal W3C WebDriver client for headless Chromium (Debian's ``chromium`` and
``chromium-driver``), with the standard library only: enough to open a page, run a script in
it, read the browser's console log and take a full-page screenshot.

``scripts/install-browser.sh`` installs both packages where that is possible (the README's test
command runs it); :func:`missing` says why a browser test must skip otherwise.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: flags that work in containers and CI: no sandbox (root), no GPU, nothing fetched
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _find() -> tuple[str | None, str | None]:
    browser = next((p for b in BROWSERS if (p := shutil.which(b))), None)
    return browser, shutil.which("chromedriver")


def missing() -> str | None:
    """None when a browser and its driver are installed, else why the test cannot run."""
    browser, driver = _find()
    if browser and driver:
        return None
    what = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p)
    return (f"{what} not installed: run `sh scripts/install-browser.sh` (Debian/Ubuntu: "
            "apt-get install chromium chromium-driver, needs root)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chromium:
    """``with Chromium() as b: b.open(url); b.run("return 1")``: one headless browser session."""

    def __init__(self, timeout: float = 60.0) -> None:
        browser, driver = _find()
        if not (browser and driver):
            raise RuntimeError(missing())
        self.port = _free_port()
        self.profile = tempfile.mkdtemp(prefix="mtlcv-chromium-")
        self.proc = subprocess.Popen([driver, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._call("GET", "/status").get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        caps = {"browserName": "chrome",
                "goog:chromeOptions": {"binary": browser,
                                       "args": [*FLAGS, f"--user-data-dir={self.profile}"]},
                "goog:loggingPrefs": {"browser": "ALL"}}
        try:
            self.session = self._call("POST", "/session",
                                      {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        except Exception:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read() or b"{}").get("value")
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("value", {})
            raise RuntimeError(f"webdriver {method} {path}: {detail.get('message', exc)}") from None

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def open(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``return`` its result) in the page."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def console(self) -> list[dict[str, Any]]:
        """The browser's console log since the last call: ``{"level", "message", ...}``."""
        return self._call("POST", self._s("/se/log"), {"type": "browser"}) or []

    def screenshot(self, path: str | Path) -> Path:
        """A PNG of the whole page (beyond the viewport), via the DevTools protocol."""
        try:
            shot = self._call("POST", self._s("/goog/cdp/execute"), {
                "cmd": "Page.captureScreenshot",
                "params": {"format": "png", "captureBeyondViewport": True}})["data"]
        except RuntimeError:  # a driver without the CDP endpoint: the viewport only
            shot = self._call("GET", self._s("/screenshot"))
        path = Path(path)
        path.write_bytes(base64.b64decode(shot))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "session", None):
                self._call("DELETE", self._s(""))
        except Exception:  # noqa: BLE001 - closing a browser that already went away
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

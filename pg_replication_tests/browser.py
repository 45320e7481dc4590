"""Headless Chromium driven over the DevTools protocol (websockets, already installed with
dagster-webserver): open a page, wait for text, click by text, save a screenshot."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, width: int = 1400, height: int = 900) -> None:
        assert CHROMIUM, "chromium is not installed"
        self.profile = tempfile.mkdtemp(prefix="pgr_chromium_")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", f"--window-size={width},{height}", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 180
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.loads(subprocess.run(["curl", "-s", "--max-time", "120", f"http://127.0.0.1:{port}/json"], capture_output=True, text=True).stdout)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 << 20)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *texts: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while True:
            body = self.text()
            if all(t in body for t in texts):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"page never showed {texts!r}; it shows: {body[:500]!r}")
            time.sleep(0.3)

    def wait_until_still(self, timeout: float = 60) -> None:
        """Wait until the page's layout stops changing (three equal looks in a row); a page that
        keeps moving (an animation) is pictured as it is when ``timeout`` ends."""
        look = "JSON.stringify([...document.querySelectorAll('*')].slice(0, 3000).map(e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }))"
        deadline, last, same = time.monotonic() + timeout, None, 0
        while same < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.evaluate(look)
            same, last = (same + 1 if now == last else 0), now

    def _act(self, text: str, action: str, last: bool = True) -> None:
        found = self.evaluate(
            "(() => { const els = [...document.querySelectorAll('button, a, span, div, h1, h2, h3, h4')]"
            f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null);"
            f" if (!els.length) return false; const e = els[{'els.length - 1' if last else '0'}];"
            f" e.scrollIntoView({{block: 'center'}}); {action}; return true; }})()"
        )
        if not found:
            raise AssertionError(f"nothing visible labelled {text!r}")

    def click_text(self, text: str, last: bool = True) -> None:
        """Click the visible element whose text is exactly ``text`` (the innermost, by default)."""
        self._act(text, "e.click()", last)

    def scroll_to_text(self, text: str) -> None:
        self._act(text, "void 0")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

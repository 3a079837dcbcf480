"""The quickstart notebook in JupyterLab in a real headless Chromium: Run All, wait for training, check the form, the
plot and the sample gallery are on the page, and save a screenshot (output/quickstart_jupyterlab.png).

Slow and needs Debian's `chromium` (`apt-get install chromium`), so it is skipped unless `pytest --run-slow`. It drives
Chromium through the DevTools protocol with `websocket-client` (installed with jupyterlab), so it needs no other package."""
import base64, json, os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOT = ROOT/"output"/"quickstart_jupyterlab.png"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if (v := check()): return v
        except Exception: pass
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}")


class Page:
    "The first page of a Chromium started with --remote-debugging-port, over the DevTools protocol."
    def __init__(self, port: int):
        import websocket
        targets = wait_for(lambda: json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json")), 30, "Chromium")
        self.ws, self.n = websocket.create_connection([t for t in targets if t["type"] == "page"][0]["webSocketDebuggerUrl"], timeout=60), 0

    def send(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while (msg := json.loads(self.ws.recv())).get("id") != self.n: pass
        if "error" in msg: raise RuntimeError(msg["error"])
        return msg["result"]

    def js(self, expr: str):
        return self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)["result"].get("value")


@pytest.fixture
def lab(tmp_path):
    if not shutil.which("chromium"): pytest.skip("needs Debian's chromium package")
    shutil.copy(ROOT/"nbs"/"quickstart.ipynb", tmp_path)
    port, token = free_port(), "lora-kit-test"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", f"--IdentityProvider.token={token}",
                               f"--ServerApp.root_dir={tmp_path}", "--ServerApp.open_browser=False", "--allow-root"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}").status == 200, 120, "JupyterLab")
    dport = free_port()
    browser = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={dport}",
                                "--window-size=1400,5000", f"--user-data-dir={tmp_path/'chrome'}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try: yield Page(dport), f"http://127.0.0.1:{port}/lab/tree/quickstart.ipynb?token={token}"
    finally:
        browser.terminate(); server.terminate(); browser.wait(30); server.wait(30)


def run_all(page: Page):
    "Click the first cell, then Shift+Enter through every cell, as a person would."
    x, y = page.js("(r => [r.left + 20, r.top + 10])(document.querySelector('.jp-Notebook .jp-Cell .jp-InputPrompt').getBoundingClientRect())")
    for t in ("mousePressed", "mouseReleased"): page.send("Input.dispatchMouseEvent", type=t, x=x, y=y, button="left", clickCount=1)
    for _ in range(page.js("document.querySelectorAll('.jp-Notebook .jp-Cell').length")):
        for t in ("rawKeyDown", "keyUp"):
            page.send("Input.dispatchKeyEvent", type=t, key="Enter", code="Enter", windowsVirtualKeyCode=13, modifiers=8)
        time.sleep(0.3)


def test_quickstart_in_jupyterlab(lab):
    page, url = lab
    page.send("Page.enable"); page.send("Page.navigate", url=url)
    wait_for(lambda: page.js("document.querySelectorAll('.jp-Notebook .jp-Cell').length > 5"), 120, "the notebook")
    wait_for(lambda: page.js("!!document.querySelector('.jp-Notebook-ExecutionIndicator[data-status=idle]') || "
                             "document.body.innerText.includes('Idle')"), 120, "the kernel")
    run_all(page)
    try: wait_for(lambda: page.js("document.body.innerText.includes('finished after')"), 400, "training to finish")
    except TimeoutError:
        SHOT.parent.mkdir(exist_ok=True)
        SHOT.with_name("quickstart_jupyterlab_failed.png").write_bytes(base64.b64decode(page.send("Page.captureScreenshot", format="png")["data"]))
        raise AssertionError(page.js("document.body.innerText")[-3000:]) from None
    wait_for(lambda: page.js("document.body.innerText.includes('sample images in')"), 60, "the last cells")
    text = page.js("document.body.innerText")
    assert "max_train_steps" in text and "Command line" in text                       # the form
    n_images = page.js("document.querySelectorAll('.jp-OutputArea img').length")          # thumbnails, histogram, plot, gallery
    assert n_images >= 8 + 2 + 6, n_images
    page.js("document.querySelector('.widget-tab') && document.querySelector('.widget-tab').scrollIntoView()")
    SHOT.parent.mkdir(exist_ok=True)
    SHOT.write_bytes(base64.b64decode(page.send("Page.captureScreenshot", format="png")["data"]))
    assert SHOT.stat().st_size > 50_000

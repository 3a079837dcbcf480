"""The quickstart notebook in JupyterLab in a real headless Chromium, as a newcomer uses it: Run All; while the
`trainer.wait()` cell blocks the kernel, click Stop and check the run stops within a step and its status stays true
through the rest of Run All; check the form, the plot and the sample gallery are on the page; then Train again (a new
run folder, a fresh bar and status) and Stop that too. Screenshots go to output/quickstart_jupyterlab*.png.

Slow and needs Debian's `chromium` (`apt-get install chromium`), so it is skipped unless `pytest --run-slow`. It drives
Chromium through the DevTools protocol with `websocket-client` (installed with jupyterlab), so it needs no other package."""
import base64, json, os, re, shutil, socket, subprocess, sys, time, urllib.request
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
    browser = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={dport}", "--remote-allow-origins=*",
                                "--window-size=1400,5000", f"--user-data-dir={tmp_path/'chrome'}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try: yield Page(dport), f"http://127.0.0.1:{port}/lab/tree/quickstart.ipynb?token={token}"
    finally:
        browser.terminate(); server.terminate(); browser.wait(30); server.wait(30)


def click_at(page: Page, js_element: str):
    "A real mouse click in the middle of the element `js_element` (a JS expression) finds."
    page.js(f"{js_element}.scrollIntoView({{block: 'center'}})"); time.sleep(0.3)
    x, y = page.js(f"(r => [r.left + r.width / 2, r.top + r.height / 2])({js_element}.getBoundingClientRect())")
    page.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y); time.sleep(0.2)
    for t in ("mousePressed", "mouseReleased"): page.send("Input.dispatchMouseEvent", type=t, x=x, y=y, button="left", clickCount=1)


def run_all(page: Page):
    "Run > Run All Cells, clicked in JupyterLab's menu bar as a person would."
    click_at(page, "[...document.querySelectorAll('.lm-MenuBar-itemLabel')].find(e => e.innerText.trim() == 'Run')")
    item = "[...document.querySelectorAll('.lm-Menu-itemLabel')].find(e => e.innerText.trim() == 'Run All Cells')"
    wait_for(lambda: page.js(f"!!{item}"), 10, "the Run menu")
    click_at(page, item)


def click_button(page: Page, label: str):
    "A real mouse click on the output area's button labelled `label`."
    click_at(page, f"[...document.querySelectorAll('.jp-OutputArea button')].find(b => b.innerText.trim() == {json.dumps(label)})")


def shown_step(page: Page) -> int:
    "The step the live view's stats line shows (0 before the first)."
    m = re.findall(r"step (\d+)/\d+ · epoch", page.js("document.body.innerText"))
    return int(m[-1]) if m else 0


def screenshot(page: Page, name: str):
    SHOT.parent.mkdir(exist_ok=True)
    SHOT.with_name(name).write_bytes(base64.b64decode(page.send("Page.captureScreenshot", format="png")["data"]))


def fail(page: Page, what: str):
    screenshot(page, "quickstart_jupyterlab_failed.png")
    raise AssertionError(f"{what}:\n" + page.js("document.body.innerText")[-3000:]) from None


def test_quickstart_in_jupyterlab(lab):
    page, url = lab
    page.send("Page.enable"); page.send("Page.navigate", url=url)
    wait_for(lambda: page.js("document.querySelectorAll('.jp-Notebook .jp-Cell').length > 5"), 120, "the notebook")
    wait_for(lambda: page.js("!!document.querySelector('.jp-Notebook-ExecutionIndicator[data-status=idle]') || "
                             "document.body.innerText.includes('Idle')"), 120, "the kernel")
    run_all(page)
    text = lambda: page.js("document.body.innerText")
    # Run All is now blocked in `trainer.wait()`: the Stop button must still act, within a step
    try: wait_for(lambda: shown_step(page) >= 5, 400, "training to pass step 5")
    except TimeoutError: fail(page, "no training progress")
    click_button(page, "Stop")
    at_click = shown_step(page)
    try: wait_for(lambda: "steps in" in text() and "stopped after" in text(), 120, "the run to stop")
    except TimeoutError: fail(page, f"Stop clicked at step {at_click} during Run All did not stop the run")
    stopped = int(re.search(r"stopped after (\d+) steps in", text()).group(1))
    assert at_click <= stopped <= at_click + 2, (at_click, stopped)         # the current step ends, then it saves
    try: wait_for(lambda: re.search(r"\d+ sample images in \S+run-001", text()) and "prompts drawn as a star: " in text(), 300, "the last cells")
    except TimeoutError: fail(page, "the cells after wait() did not run")
    assert f"stopped after {stopped} steps in" in text() and "stopping after this step" not in text()   # the status stays true
    try: printed = wait_for(lambda: re.search(r"(\w+ after \d+ steps), final avr_loss", text()), 30, "wait()'s summary line")
    except TimeoutError: fail(page, "no summary line from wait()")
    assert printed.group(1) == f"stopped after {stopped} steps", printed.group(0)                   # and wait() returned that run
    assert "Base model" in text() and "basics" in text() and "Command line" in text()               # the form, in words
    n_images = page.js("document.querySelectorAll('.jp-OutputArea img').length")   # thumbnails, histogram, plot, gallery, static
    assert n_images >= 8 + 2 + 4, n_images
    page.js("document.querySelector('.widget-tab') && document.querySelector('.widget-tab').scrollIntoView()")
    screenshot(page, SHOT.name)
    assert SHOT.stat().st_size > 50_000
    # Train again from the button once Run All is done: a new run folder, a fresh bar and status at once; Stop that run too
    try: wait_for(lambda: "| Idle" in text(), 180, "the kernel to be idle after Run All")
    except TimeoutError: fail(page, "the kernel stayed busy after Run All")
    click_button(page, "Train")
    try: wait_for(lambda: "preparing the run in" in text() and "run-002" in text(), 30, "the second run's status")
    except TimeoutError: fail(page, "the second Train showed no status")
    assert f"stopped after {stopped} steps in" not in text()                # the first run's status is gone
    try: wait_for(lambda: shown_step(page) >= 2, 300, "the second run to train")
    except TimeoutError: fail(page, "the second run did not train")
    click_button(page, "Stop")
    at_click = shown_step(page)
    try: again = wait_for(lambda: re.search(r"stopped after (\d+) steps in", text()), 120, "the second run to stop")
    except TimeoutError: fail(page, "Stop did not stop the second run")
    assert at_click <= int(again.group(1)) <= at_click + 2, (at_click, again.group(0))
    page.js("[...document.querySelectorAll('.jp-OutputArea button')].find(b => b.innerText.trim() == 'Stop').scrollIntoView({block: 'start'})")
    screenshot(page, "quickstart_jupyterlab_live.png")

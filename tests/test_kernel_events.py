"""`WidgetEvents` in a real ipykernel: a button click sent while a cell blocks is handled within the poll interval, and
the cells queued behind the blocking one (as in "Run all") still run afterwards, in order."""
import queue, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel(monkeypatch):
    jupyter_client = pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    try: yield kc
    finally: kc.stop_channels(); km.shutdown_kernel(now=True)


def stream_text(kc, timeout: float) -> str:
    end = time.time() + timeout
    while time.time() < end:
        try: m = kc.get_iopub_msg(timeout=1)
        except queue.Empty: continue
        if m["msg_type"] == "stream": return m["content"]["text"].strip()
    raise TimeoutError("no output")


def test_click_while_a_cell_blocks(kernel):
    kc = kernel
    kc.execute("import ipywidgets as W, time\nfrom lora_kit.runtime.kernel_events import WidgetEvents\nclicked = []\n"
               "b = W.Button()\nb.on_click(lambda _: clicked.append(time.time()))\nprint(b.model_id)")
    model_id = stream_text(kc, 60)
    blocking = kc.execute("t0 = time.time()\nwith WidgetEvents() as ev:\n"
                          "    while not clicked and time.time() - t0 < 30: ev.poll(); time.sleep(0.05)\n"
                          "print(f'available={ev.available} clicked={bool(clicked)} after={clicked[0] - t0 if clicked else None}')")
    queued = kc.execute("print('queued cell ran; clicks:', len(clicked))")
    time.sleep(1.0)
    sent = time.time()
    kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": model_id, "data": {"method": "custom", "content": {"event": "click"}}}))
    first = stream_text(kc, 30)
    assert first.startswith("available=True clicked=True"), first
    assert time.time() - sent < 5
    assert stream_text(kc, 30) == "queued cell ran; clicks: 1"
    replies = {}
    while not {blocking, queued} <= set(replies):
        r = kc.get_shell_msg(timeout=30); replies[r["parent_header"].get("msg_id")] = r["content"].get("status")
    assert replies[blocking] == replies[queued] == "ok"

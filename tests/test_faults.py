"Faults: kills, signals, NaN, a full disk and concurrent runs never lose or corrupt a LoRA."
import errno, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from lora_kit.lora import load_lora, save_lora
from lora_kit.toy.world import write_folder

TRAIN = ["--pretrained_model_name_or_path", "tiny-sd1", "--caption_extension", ".txt", "--resolution", "64",
         "--network_module", "networks.lora", "--network_dim", "4", "--max_data_loader_n_workers", "0", "--seed", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_folder(d / "5_sks", n=4, seed=0)
    return d


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "lora_kit.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_sigkill_during_save_keeps_previous_file(tmp_path):
    "A process killed while overwriting a LoRA leaves the previous, complete file."
    target = tmp_path / "lora.safetensors"
    old = {"a.lora_down.weight": torch.zeros(32, 1024, 1024)}           # 128 MB: a save takes a while
    save_lora(old, target)
    script = textwrap.dedent(f"""
        import torch, sys
        from lora_kit.lora import save_lora
        new = {{"a.lora_down.weight": torch.ones(32, 1024, 1024)}}
        print("ready", flush=True)
        while True: save_lora(new, {str(target)!r})
    """)
    for delay in (0.05, 0.4):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.kill(); p.wait()
        state, _ = load_lora(target)                                   # always a complete file …
        v = state["a.lora_down.weight"]
        assert bool((v == 0).all()) or bool((v == 1).all())           # … either the old one or a finished new one


def test_sigterm_saves_and_exits_clearly(tmp_path, data):
    p = cli("train_network", *TRAIN, "--train_data_dir", str(data), "--output_dir", str(tmp_path), "--output_name", "run",
            "--max_train_steps", "100000", "--save_every_n_steps", "1")
    deadline = time.time() + 300
    while not (tmp_path / "run-step00000001.safetensors").exists() and time.time() < deadline: time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    msg, hint = err.strip().splitlines()[-2:]                          # the stop, then how to continue (no state: a hint)
    assert "interrupted at step" in msg and "saved in" in msg
    assert hint.startswith("no training state was saved") and "add --save_state" in hint and f"--network_weights {msg.split('saved in ')[1]}" in hint
    saved = Path(msg.split("saved in ")[1])
    step = int(msg.split("interrupted at step ")[1].split(":")[0])
    assert step >= 1 and int(load_lora(saved)[1]["ss_steps"]) == step
    assert not list(tmp_path.glob("*.lock"))                           # the lock is released


def test_nan_loss_stops_naming_the_step(tmp_path, data):
    p = cli("train_network", *TRAIN, "--train_data_dir", str(data), "--output_dir", str(tmp_path), "--output_name", "nan",
            "--learning_rate", "1e30", "--optimizer_type", "SGDNesterov", "--max_grad_norm", "0", "--max_train_steps", "50")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, err[-2000:]
    assert "the loss became NaN/inf at step" in err and "lower --learning_rate" in err
    assert list(tmp_path.glob("nan-step*.safetensors"))


def test_nan_loss_skip_policy(tmp_path, data, monkeypatch):
    from lora_kit.config import make_config
    from lora_kit.train import Callback, train
    import lora_kit.loss as L
    calls = {"n": 0}
    real = L.DDPMObjective.__call__
    def sometimes_nan(self, predict, latents, generator=None, mask=None):
        calls["n"] += 1
        out = real(self, predict, latents, generator, mask)
        return out * float("nan") if calls["n"] == 2 else out
    monkeypatch.setattr(L.DDPMObjective, "__call__", sometimes_nan)
    cfg = make_config([*TRAIN, "--train_data_dir", str(data), "--output_dir", str(tmp_path), "--max_train_steps", "4",
                       "--on_nan_loss", "skip"])
    state = train(cfg)
    assert state.step == 4 and (tmp_path / "last.safetensors").is_file()


def test_disk_full_keeps_earlier_checkpoint(tmp_path, data, monkeypatch):
    from lora_kit.config import make_config
    from lora_kit import lora as lora_mod
    from lora_kit.train import TrainingStopped, train
    real = lora_mod.save_file
    def full_after_first(tensors, path, metadata=None):
        if list(tmp_path.glob("*-step*.safetensors")):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata)
    monkeypatch.setattr(lora_mod, "save_file", full_after_first)
    cfg = make_config([*TRAIN, "--train_data_dir", str(data), "--output_dir", str(tmp_path), "--output_name", "full",
                       "--max_train_steps", "6", "--save_every_n_steps", "2"])
    with pytest.raises(TrainingStopped, match="disk is full while writing"):
        train(cfg)
    first = tmp_path / "full-step00000002.safetensors"
    assert load_lora(first)[1]["ss_steps"] == "2"                     # the earlier file is intact
    assert not list(tmp_path.glob(".*.tmp"))                           # no partial file left behind


def test_second_run_into_same_output_refuses(tmp_path, data):
    (tmp_path / ".same.lock").write_text(str(os.getpid()))            # a live run holds the lock
    p = cli("train_network", *TRAIN, "--train_data_dir", str(data), "--output_dir", str(tmp_path), "--output_name", "same",
            "--max_train_steps", "1")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "another run (process" in err and "--ignore_output_lock" in err


def test_resume_after_sigkill_is_exact(tmp_path, data):
    "Killed (SIGKILL) after the state of step 3 exists, then resumed: the final LoRA is bit-for-bit the uninterrupted run's."
    from lora_kit.config import make_config
    from lora_kit.train import train
    args = [*TRAIN, "--train_data_dir", str(data), "--train_batch_size", "4", "--output_name", "run"]   # 5 steps per epoch
    killed, state = tmp_path / "killed", tmp_path / "killed" / "run-step00000003-state"
    p = cli("train_network", *args, "--output_dir", str(killed), "--max_train_steps", "100000", "--save_state",
            "--save_every_n_steps", "3")
    deadline = time.time() + 300
    while not state.is_dir() and time.time() < deadline and p.poll() is None: time.sleep(0.1)
    p.kill(); p.communicate()
    assert state.is_dir(), "the state of step 3 was never written"
    assert (killed / ".run.lock").exists()                             # killed for real: nothing cleaned up
    whole = train(make_config([*args, "--output_dir", str(tmp_path / "whole"), "--max_train_steps", "6"]), progress=False)
    resumed = train(make_config([*args, "--output_dir", str(killed), "--max_train_steps", "6", "--resume", str(state)]), progress=False)
    a, md = load_lora(tmp_path / "whole" / "run.safetensors")
    b, md_b = load_lora(killed / "run.safetensors")
    assert md_b["ss_steps"] == "6" and md_b["ss_epoch"] == "2"         # resumed mid-epoch 1, crossed into epoch 2
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        max((a[k] - b[k]).abs().max().item() for k in a)
    assert [h[2] for h in resumed.history] == [h[2] for h in whole.history]   # the same losses, step by step

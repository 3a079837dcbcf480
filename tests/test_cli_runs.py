"""What a user sees from `lora-kit train_network` on the console: the notes about an earlier run's files, the model
loading and sampling lines, the command that continues after Ctrl-C, and a run without the notebook packages."""
import signal, subprocess, sys, time
from pathlib import Path

import pytest

from lora_kit.toy.world import write_folder

TRAIN = ["--pretrained_model_name_or_path", "tiny-sd1", "--caption_extension", ".txt", "--resolution", "64",
         "--network_module", "networks.lora", "--network_dim", "4", "--max_data_loader_n_workers", "0", "--seed", "1"]
NOTEBOOK_ONLY = ("ipywidgets", "matplotlib", "jupyterlab", "IPython", "nbdev", "fastcore", "execnb", "ghapi", "tensorboard")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_folder(d / "5_sks", n=4, seed=0)
    return d


def fake_lora(path: Path, **metadata):
    from safetensors.torch import save_file
    import torch
    save_file({"x": torch.zeros(1)}, str(path), {"ss_session_id": "old", "ss_training_started_at": "1700000000", "ss_steps": "500",
                                                 "ss_network_dim": "16", **metadata})


def lean_run(*args: str) -> subprocess.CompletedProcess:
    "`lora-kit <args>` in a fresh process where the notebook and dev packages cannot be imported, as after `pip install lora-kit`."
    code = (f"import sys\nfor m in {NOTEBOOK_ONLY!r}: sys.modules[m] = None\n"   # `import m` now fails, as when m is not installed
            "from lora_kit.cli import main\nrc = main(sys.argv[1:])\n"
            f"print('imported:', sorted(m for m in sys.modules if m.split('.')[0] in {NOTEBOOK_ONLY!r} and sys.modules[m] is not None))\n"
            "sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)


def test_second_run_names_what_it_replaces_and_shows_its_phases(tmp_path, data):
    """One run into a folder where another run left its LoRA (other settings) and a step save: the notes before training,
    the model loading lines, the sampling progress lines, all without the notebook packages installed."""
    out = tmp_path / "out"; out.mkdir()
    fake_lora(out / "run.safetensors"); fake_lora(out / "run-step00000500.safetensors")
    (out / "run_loss.csv").write_text("step,epoch,loss,avr_loss,lr\n")
    prompts = tmp_path / "prompts.txt"; prompts.write_text("a red sks --w 64 --h 64 --s 2 --d 1\na blue sks --w 64 --h 64 --s 2 --d 2\n")
    r = lean_run("train_network", *TRAIN, "--train_data_dir", str(data), "--output_dir", str(out), "--output_name", "run",
                 "--max_train_steps", "2", "--sample_prompts", str(prompts), "--sample_every_n_steps", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    note = next(l for l in lines if l.startswith("note: this run replaces "))
    assert "run.safetensors (2023-11-1" in note and "500 steps), run_loss.csv in " in note and "as sd-scripts does" in note
    other = next(l for l in lines if l.startswith(f"warning: {out / 'run.safetensors'} is the LoRA of another run"))
    assert "network_dim 16 there, 4 here" in other and "it will be overwritten" in other
    stale = next(l for l in lines if l.startswith(f"warning: {out} holds 1 step/epoch save of another run"))
    assert "run-step00000500.safetensors" in stale and "another --output_name" in stale
    assert lines.index(note) < lines.index(next(l for l in lines if l.startswith("loading tiny-sd1")))   # said before loading
    assert any(l.startswith("loaded in ") and " parameters, " in l for l in lines)
    err = r.stderr.replace("\r", "\n")
    assert f"sampling prompt 1/2 at step 1 → {out / 'sample'}" in err and f"sampling prompt 2/2 at step 1 → {out / 'sample'}" in err
    assert f"sampled 2 prompts at step 1 in " in err and f"sampled 2 prompts at step 2 in " in err
    assert len(list((out / "sample").glob("run_*.png"))) == 4
    assert (out / "run_loss.png").stat().st_size > 0                   # drawn without matplotlib
    assert lines[-1] == "imported: []", lines[-1]
    assert "Loading weights" not in err                                # transformers' loading bars stay off the screen


def test_logging_dir_without_tensorboard_names_the_install(tmp_path, data):
    r = lean_run("train_network", *TRAIN, "--train_data_dir", str(data), "--output_dir", str(tmp_path), "--max_train_steps", "1",
                 "--logging_dir", str(tmp_path / "logs"))
    assert r.returncode == 2 and "pip install tensorboard" in r.stderr and "loading " not in r.stdout, r.stderr[-2000:]


def test_ctrl_c_prints_the_command_that_resumes(tmp_path, data):
    args = ["train_network", *TRAIN, "--train_data_dir", str(data), "--output_dir", str(tmp_path), "--output_name", "run",
            "--max_train_steps", "100000", "--save_every_n_steps", "1", "--save_state"]
    p = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "run-step00000001.safetensors").exists() and time.time() < deadline and p.poll() is None: time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    stop, cont = err.strip().splitlines()[-2:]
    step = int(stop.split("interrupted at step ")[1].split(":")[0])
    state = tmp_path / f"run-step{step:08d}-state"
    assert cont == "to continue: lora-kit " + " ".join(args) + f" --resume {state}", cont
    from lora_kit.runtime.checks import resume_problems
    assert state.is_dir() and resume_problems(state) == []             # the folder it names is a complete state


def test_import_and_help_need_no_notebook_package():
    "The CLI path imports none of the notebook or dev packages: `train_network --help`, and importing lora_kit.train."
    for code in ("from lora_kit.cli import main; main(['train_network', '--help'])", "import lora_kit.train, lora_kit.sample"):
        r = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n"
                            f"print(sorted(m for m in {NOTEBOOK_ONLY!r} if m in sys.modules))"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.splitlines()[-1] == "[]", (code, r.stdout[-500:], r.stderr[-2000:])


def test_plan_prints_each_phase():
    "`lora-kit plan <training flags>`: the planned device memory, phase by phase, nothing loaded."
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "plan", "--pretrained_model_name_or_path", "tiny-sd1", "--resolution", "64",
                        "--network_dim", "4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    phases = {l.split()[0] for l in r.stdout.splitlines() if l.split()}
    assert {"loading", "caching", "training", "sampling", "peak", "LoRA"} <= phases, r.stdout
    assert "warn" not in r.stderr.lower(), r.stderr[-2000:]

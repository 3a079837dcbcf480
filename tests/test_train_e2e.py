"End to end: the sd-scripts command line trains a LoRA on the tiny model; the file loads in diffusers."
import csv

import pytest
import torch

from lora_kit.toy.world import write_folder
from helpers import run_cli

ARGS = ["--pretrained_model_name_or_path", "tiny-sd1", "--caption_extension", ".txt", "--resolution", "64",
        "--train_batch_size", "4", "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8",
        "--learning_rate", "1e-3", "--max_train_steps", "60", "--seed", "42", "--max_data_loader_n_workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    write_folder(d / "data" / "10_sks", n=8, seed=0)
    run_cli("train_network", *ARGS, "--train_data_dir", str(d / "data"), "--output_dir", str(d / "out"),
            "--output_name", "toy", "--save_every_n_steps", "30", "--logging_dir", str(d / "logs"))
    return d


def test_files_written(trained):
    out = trained / "out"
    assert (out / "toy.safetensors").is_file() and (out / "toy-step00000030.safetensors").is_file()
    assert (out / "toy_loss.png").stat().st_size > 1000
    assert list((trained / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"


def test_loss_falls(trained):
    rows = list(csv.DictReader(open(trained / "out" / "toy_loss.csv")))
    assert len(rows) == 60
    first = sum(float(r["loss"]) for r in rows[:10]) / 10
    last = sum(float(r["loss"]) for r in rows[-10:]) / 10
    assert last < 0.85 * first, (first, last)


def test_kohya_keys_and_metadata(trained):
    from lora_kit.lora import load_lora
    state, md = load_lora(trained / "out" / "toy.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in state)
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "8.0" and md["ss_steps"] == "60"
    assert md["ss_base_model_version"] == "sd_v1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_up.weight")), "nothing was learned"


def test_diffusers_loads_every_key(trained):
    from diffusers.utils import logging as dlogging
    from lora_kit.lora import count_peft_layers, load_lora
    from lora_kit.families.sd import tiny_components
    comp = tiny_components("tiny-sd1")
    pipe = comp.family.pipeline(comp)
    gen = lambda: pipe("a red sks at the center", num_inference_steps=4, height=64, width=64, output_type="pt",
                       generator=torch.Generator().manual_seed(0)).images
    before = gen()
    dlogging.set_verbosity_error()
    pipe.load_lora_weights(str(trained / "out" / "toy.safetensors"))
    state, _ = load_lora(trained / "out" / "toy.safetensors")
    n_modules = sum(k.endswith(".lora_down.weight") for k in state)
    assert count_peft_layers(pipe.unet) + count_peft_layers(pipe.text_encoder) == n_modules
    assert not torch.allclose(gen(), before)


def test_bad_flags_listed_before_loading(tmp_path):
    r = run_cli("train_network", "--pretrained_model_name_or_path", "tiny-sd1", "--network_module", "networks.lora",
                "--train_data_dir", str(tmp_path / "missing"), "--resolution", "64", "--output_dir", str(tmp_path),
                "--network_dimm", "4", check=False)
    assert r.returncode == 2
    assert "unknown option --network_dimm (did you mean --network_dim?)" in r.stderr


def test_config_file_and_output_config(tmp_path):
    write_folder(tmp_path / "data" / "2_sks", n=2, seed=1)
    toml = tmp_path / "cfg.toml"
    run_cli("train_network", *ARGS, "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
            "--config_file", str(toml), "--output_config")
    assert "network_dim = 8" in toml.read_text()
    run_cli("train_network", "--config_file", str(toml), "--max_train_steps", "3", "--output_name", "fromtoml")
    assert (tmp_path / "out" / "fromtoml.safetensors").is_file()


def test_torch_compile_trains_the_compiled_model(tmp_path):
    "--torch_compile: the denoiser that trains is the compiled one (dynamo captured its graphs), with the eager losses."
    import torch._dynamo
    from lora_kit.config import make_config
    from lora_kit.train import Callback, train
    torch.set_num_threads(1)
    write_folder(tmp_path / "data" / "1_sks", n=4, seed=0)

    class Compiled(Callback):
        uses_models = False
        def __init__(self): self.seen = []
        def on_step_end(self, state): self.seen.append(state.comp.denoiser._compiled_call_impl is not None)

    def losses(*extra):
        cb = Compiled()
        argv = [*ARGS[:14], "--max_train_steps", "3", "--seed", "1", "--train_data_dir", str(tmp_path / "data"),
                "--output_dir", str(tmp_path / "out"), *extra]
        state = train(make_config(argv), [cb], progress=False)
        return [h[2] for h in state.history], cb.seen

    eager, seen = losses()
    assert seen == [False] * 3
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled, seen = losses("--torch_compile", "--dynamo_backend", "aot_eager")   # inductor gives the same, after minutes of compiling
    assert seen == [True] * 3 and torch._dynamo.utils.counters["stats"]["unique_graphs"] > before
    assert compiled == pytest.approx(eager, rel=1e-4) and compiled[0] != compiled[-1]

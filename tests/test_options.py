"train_network options that need a real (tiny) training run: resume, pruning, seed, what is trained, precision, logs."
import json
from pathlib import Path

import pytest
import torch

from lora_kit.config import make_config
from lora_kit.lora import load_lora
from lora_kit.toyworld import write_folder
from lora_kit.train import machine_problems, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_folder(d / "3_sks", n=3, seed=0)        # 9 images with repeats, batch 2 -> 5 batches per epoch
    return d


def run(data, out, *extra, steps=10):
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "64", "--train_batch_size", "2", "--network_module", "networks.lora", "--network_dim", "4",
            "--learning_rate", "1e-3", "--max_train_steps", str(steps), "--seed", "1", "--max_data_loader_n_workers", "0",
            "--output_dir", str(out), *extra]
    return train(make_config(argv))


def test_resume_continues_the_same_loss_curve(data, tmp_path):
    # 10 steps, saving LoRA + state every 3 steps and keeping the last 3 steps' worth; dropout exercises the RNG
    a = run(data, tmp_path, "--output_name", "a", "--save_every_n_steps", "3", "--save_state", "--save_last_n_steps", "3",
            "--network_dropout", "0.1")
    names = {p.name for p in tmp_path.iterdir()}
    assert {"a-step00000006.safetensors", "a-step00000009.safetensors", "a-step00000006-state", "a-step00000009-state",
            "a-state", "a.safetensors"} <= names
    assert "a-step00000003.safetensors" not in names and "a-step00000003-state" not in names, "not pruned"
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    st = json.loads((tmp_path / "a-step00000006-state" / "train_state.json").read_text())
    assert (st["current_epoch"], st["current_step"]) == (2, 6)
    # resume mid-epoch 2 (step 6 of 10, 5 steps per epoch)
    b = run(data, tmp_path, "--output_name", "b", "--resume", str(tmp_path / "a-step00000006-state"), "--network_dropout", "0.1")
    assert [h[0] for h in b.history] == list(range(1, 11))
    torch.testing.assert_close([h[2] for h in b.history], [h[2] for h in a.history])
    sa, _ = load_lora(tmp_path / "a.safetensors")
    sb, md = load_lora(tmp_path / "b.safetensors")
    for k in sa: torch.testing.assert_close(sb[k], sa[k])
    assert md["ss_steps"] == "10"


def test_same_seed_same_lora_and_sd_scripts_log_names(data, tmp_path):
    run(data, tmp_path / "1", "--output_name", "x", steps=3)
    run(data, tmp_path / "2", "--output_name", "x", "--logging_dir", str(tmp_path / "logs"), "--log_prefix", "pre_",
        "--text_encoder_lr", "5e-4", "--unet_lr", "1e-3", steps=3)
    run(data, tmp_path / "3", "--output_name", "x", "--seed", "2", steps=3)
    s1, s2, s3 = (load_lora(tmp_path / n / "x.safetensors")[0] for n in "123")
    run(data, tmp_path / "1b", "--output_name", "x", steps=3)
    assert all(torch.equal(v, load_lora(tmp_path / "1b" / "x.safetensors")[0][k]) for k, v in s1.items())   # same seed: identical
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)       # other seed: different
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)       # other text-encoder lr: different
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, = (tmp_path / "logs").iterdir()
    assert run_dir.name.startswith("pre_")
    ev = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents.*")).parent)); ev.Reload()
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder"} <= set(ev.Tags()["scalars"])
    assert ev.Scalars("lr/textencoder")[0].value == pytest.approx(5e-4)


@pytest.mark.parametrize("flag,prefix", [("--network_train_unet_only", "lora_unet_"), ("--network_train_text_encoder_only", "lora_te_")])
def test_train_only_one_part(data, tmp_path, flag, prefix):
    run(data, tmp_path, flag, "--output_name", "p", steps=1)
    state, md = load_lora(tmp_path / "p.safetensors")
    assert state and all(k.startswith(prefix) for k in state)


def test_full_bf16_on_cpu(data, tmp_path):
    s = run(data, tmp_path, "--mixed_precision", "bf16", "--full_bf16", "--output_name", "h", "--training_comment", "bf16 run",
            "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", "--metadata_author", "me", steps=15)
    assert all(p.dtype == torch.bfloat16 for p in s.network.parameters())
    state, md = load_lora(tmp_path / "h.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert md["ss_training_comment"] == "bf16 run" and md["modelspec.author"] == "me" and md["ss_mixed_precision"] == "bf16"
    assert json.loads(md["ss_dataset_dirs"]) == {"3_sks": {"n_repeats": 3, "img_count": 3}}
    # epochs 1 and 2 saved, epoch 1 pruned by --save_last_n_epochs 1; epoch 3 is the final file
    assert sorted(p.name for p in tmp_path.glob("h-*.safetensors")) == ["h-000002.safetensors"]


def test_clear_messages_before_loading(tmp_path):
    lora = tmp_path / "x.safetensors"; lora.write_bytes(b"")
    problems = lambda **kw: " | ".join(machine_problems(make_config(check=False, **kw)))
    assert "--network_weights" in problems(resume=str(lora))
    assert "does not exist" in problems(resume=str(tmp_path / "nope"))
    assert "optimizer.bin" in problems(resume=str(tmp_path))
    assert "--mixed_precision bf16" in problems(full_bf16=True)
    if not torch.cuda.is_available():
        assert "CUDA GPU" in problems(full_fp16=True, mixed_precision="fp16")
        assert "--sdpa" in problems(xformers=True)
    import importlib.util
    if importlib.util.find_spec("wandb") is None: assert "pip install wandb" in problems(log_with="wandb")
    assert "--logging_dir" in problems(log_with="tensorboard")


def test_readme_lists_exactly_the_unsupported_flags():
    from lora_kit.config import OPTIONS, unsupported_flags
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## sd-scripts options not supported yet", 1)[1].split("\n## ", 1)[0]
    listed = {f for f in OPTIONS if f"`--{f}`" in section}
    assert {f"--{f}" for f in listed} == set(unsupported_flags("train_network"))

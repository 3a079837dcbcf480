"train_network options that need a real (tiny) training run: resume, pruning, seed, what is trained, precision, logs."
import json
import math
from pathlib import Path

import pytest
import torch

from lora_kit.config import ConfigError, make_config
from lora_kit.lora import load_lora
from lora_kit.toy.world import write_folder
from lora_kit.runtime.checks import machine_problems
from lora_kit.train import train

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
    assert "eps is 0 in float16" in problems(full_fp16=True, mixed_precision="fp16", optimizer_type="AdamW")
    assert problems(full_fp16=True, mixed_precision="fp16", optimizer_type="AdamW8bit") == ""     # fp16 runs on a CPU as on a GPU
    if not torch.cuda.is_available():     # --xformers that cannot run: sdpa with a note that names --sdpa, not a refusal
        from lora_kit.runtime.placement import attention
        assert "xformers" not in problems(xformers=True) and "--sdpa" in attention(make_config(check=False, xformers=True))[1]
    import importlib.util
    if importlib.util.find_spec("wandb") is None: assert "pip install wandb" in problems(log_with="wandb")
    assert "--logging_dir" in problems(log_with="tensorboard")


def test_readme_lists_exactly_the_unsupported_flags():
    from lora_kit.config import OPTIONS, unsupported_flags
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## sd-scripts options not supported yet", 1)[1].split("\n## ", 1)[0]
    listed = {f for f in OPTIONS if f"`--{f}`" in section}
    assert {f"--{f}" for f in listed} == set(unsupported_flags("train_network"))


def lora_state(out, name="x"):
    return load_lora(out / f"{name}.safetensors")[0]


def test_clip_skip_uses_the_penultimate_layer_through_the_final_norm(data, tmp_path):
    from lora_kit.families.sd import tiny_components
    comp = tiny_components("tiny-sd1")
    te, caps = comp.text_encoders[0], ["a red sks", "a blue circle"]
    ids = comp.tokenizers[0](caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states
        ref = getattr(te, "text_model", te).final_layer_norm(hidden[-2])      # sd-scripts: hidden_states[-clip_skip] + final_layer_norm
        skip2 = comp.family.encode_text(comp, caps, clip_skip=2)["encoder_hidden_states"]
        plain = comp.family.encode_text(comp, caps)["encoder_hidden_states"]
    torch.testing.assert_close(skip2, ref)
    assert not torch.allclose(skip2, plain)
    # in training, the last text-encoder layer is then unused: its LoRA gets no gradient and stays at zero
    last = f"lora_te_text_model_encoder_layers_{te.config.num_hidden_layers - 1}_mlp_fc2.lora_up.weight"
    run(data, tmp_path / "a", "--output_name", "x", "--clip_skip", "2", steps=2)
    run(data, tmp_path / "b", "--output_name", "x", steps=2)
    assert lora_state(tmp_path / "a")[last].abs().sum() == 0 and lora_state(tmp_path / "b")[last].abs().sum() > 0


class CountCalls:
    "Counts calls of one LoRA layer in the UNet and one in the text encoder (forward hooks do not see recomputation)."
    def __init__(self): self.calls = {"unet": 0, "te": 0}
    def on_train_start(self, state):
        c = state.comp
        self.checkpointing = (c.denoiser.is_gradient_checkpointing, c.text_encoders[0].is_gradient_checkpointing)
        self.count(c.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, "unet")
        self.count(next(m for n, m in c.text_encoders[0].named_modules() if n.endswith("layers.0.mlp.fc1")), "te")
    def count(self, layer, key):
        forward = layer.forward
        def counted(*a, **kw): self.calls[key] += 1; return forward(*a, **kw)
        layer.forward = counted
    def __getattr__(self, name): return lambda *a: None


def test_gradient_checkpointing_recomputes_and_gives_the_same_update(data, tmp_path):
    from lora_kit.train import train
    counts = {}
    for flag in ("", "--gradient_checkpointing"):
        cb = CountCalls()
        argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
                "--resolution", "64", "--train_batch_size", "2", "--network_module", "networks.lora", "--network_dim", "4",
                "--learning_rate", "1e-3", "--max_train_steps", "1", "--seed", "1", "--max_data_loader_n_workers", "0",
                "--output_dir", str(tmp_path / (flag or "plain")), "--output_name", "x", *([flag] if flag else [])]
        train(make_config(argv), callbacks=[cb], progress=False)
        counts[flag] = (cb.checkpointing, cb.calls)
    assert counts[""] == ((False, False), {"unet": 1, "te": 1})
    assert counts["--gradient_checkpointing"] == ((True, True), {"unet": 2, "te": 2}), "forward not recomputed in backward"
    a, b = lora_state(tmp_path / "plain"), lora_state(tmp_path / "--gradient_checkpointing")
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.startswith("lora_te_") and "lora_up" in k)
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    write_folder(d / "1_sks", n=2, seed=0)        # 2 images, 1 repeat: one batch of 2, or two batches of 1
    return d


def update_norm(out) -> float:
    "Norm of the first SGD update: lora_up starts at zero (and lora_down gets no gradient in that step)."
    return torch.cat([v.flatten() for k, v in lora_state(out).items() if "lora_up" in k]).norm().item()


def test_gradient_accumulation_and_max_grad_norm(pair, tmp_path, monkeypatch):
    import lora_kit.loss
    from lora_kit.families.sd import SD_VARIANTS
    # noise, timesteps and latents depend only on the image, so a batch of 2 and two batches of 1 see the same examples
    monkeypatch.setattr(lora_kit.loss, "sample_noise", lambda latents, *a, **kw: torch.cos(3 * latents))
    monkeypatch.setattr(lora_kit.loss, "sample_timesteps", lambda n, *a, device=None, **kw: torch.full((n,), 500, device=device))
    monkeypatch.setattr(type(SD_VARIANTS["sd1"]), "encode_images",
                        lambda self, comp, px: comp.vae.encode(px.to(comp.vae.device)).latent_dist.mode() * comp.vae.config.scaling_factor)
    sgd = ("--output_name", "x", "--optimizer_type", "SGD", "--learning_rate", "1", "--network_alpha", "64")
    one_batch = run(pair, tmp_path / "b2", *sgd, "--max_grad_norm", "0", steps=1)
    accumulated = run(pair, tmp_path / "ga", *sgd, "--max_grad_norm", "0", "--train_batch_size", "1", "--gradient_accumulation_steps", "2", steps=1)
    run(pair, tmp_path / "b1", *sgd, "--max_grad_norm", "0", "--train_batch_size", "1", steps=1)
    run(pair, tmp_path / "clip", *sgd, "--max_grad_norm", "1e-3", steps=1)
    # sd-scripts counts optimizer steps: 2 batches per epoch / 2 accumulated = 1 step per epoch, 1 step in total
    assert (accumulated.steps_per_epoch, accumulated.step, len(accumulated.history)) == (1, 1, 1) == (one_batch.steps_per_epoch, one_batch.step, 1)
    a, b, single = lora_state(tmp_path / "ga"), lora_state(tmp_path / "b2"), lora_state(tmp_path / "b1")
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)      # updates are ~1e-3..1e-1
    assert any(not torch.allclose(single[k], b[k], rtol=1e-3) for k in b), "one image alone gives the same update: the test cannot tell"
    # --max_grad_norm 0 does not clip (sd-scripts' default would clip at 1.0); 1e-3 clips the gradient norm to 1e-3
    assert update_norm(tmp_path / "b2") > 1.5
    assert update_norm(tmp_path / "clip") == pytest.approx(1e-3, rel=1e-3)


def test_scale_weight_norms_and_scheduler_power(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from lora_kit.lora import LoRAModule
    common = ("--output_name", "x", "--learning_rate", "1e-2", "--lr_scheduler", "polynomial", "--lr_scheduler_power", "2")
    s = run(data, tmp_path / "n", *common, "--scale_weight_norms", "0.01", "--logging_dir", str(tmp_path / "logs"), steps=3)
    run(data, tmp_path / "free", *common, steps=3)
    def norms(out):
        state = lora_state(out)
        return [((state[f"{n}.lora_up.weight"].flatten(1) @ state[f"{n}.lora_down.weight"].flatten(1)) * state[f"{n}.alpha"] / state[f"{n}.lora_down.weight"].shape[0]).norm().item()
                for n in {k.split(".")[0] for k in state}]
    assert max(norms(tmp_path / "n")) <= 0.01 * (1 + 1e-4) < max(norms(tmp_path / "free"))
    ev = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent)); ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"max_norm/keys_scaled", "norm/avg_key_norm", "max_norm/max_key_norm"} <= tags
    assert ev.Scalars("max_norm/keys_scaled")[-1].value > 0 and ev.Scalars("max_norm/max_key_norm")[-1].value == pytest.approx(0.01, rel=1e-4)
    # --lr_scheduler_power reaches the schedule: polynomial decay (1 - step/3)^2 to lr_end 1e-7
    lr = lambda k: (1e-2 - 1e-7) * (1 - k / 3) ** 2 + 1e-7
    assert [h[4] for h in s.history] == pytest.approx([lr(1), lr(2), lr(3)])


def test_initial_step_and_epoch(data, tmp_path):
    from lora_kit.config import ConfigError
    # 5 steps per epoch; --skip_until_initial_step: the counter starts at 6, epoch 2, the schedule starts from 0
    fresh = run(data, tmp_path / "f", "--output_name", "x", "--lr_scheduler", "linear", steps=10)
    skip = run(data, tmp_path / "s", "--output_name", "x", "--lr_scheduler", "linear", "--initial_step", "6", "--skip_until_initial_step", steps=10)
    assert [(h[0], h[1]) for h in skip.history] == [(7, 2), (8, 2), (9, 2), (10, 2)]
    assert skip.history[0][4] == pytest.approx(fresh.history[0][4])
    # without it only the epoch number moves on: epoch 2 from its start, the counter from 0, until the last epoch ends
    epoch = run(data, tmp_path / "e", "--output_name", "x", "--initial_epoch", "2", steps=10)
    assert [(h[0], h[1]) for h in epoch.history] == [(k, 2) for k in range(1, 6)]
    assert load_lora(tmp_path / "e" / "x.safetensors")[1]["ss_steps"] == "5"
    with pytest.raises(ConfigError, match="--initial_step starts at step 10: nothing left to do with --max_train_steps 10"):
        run(data, tmp_path / "late", "--initial_step", "10", "--skip_until_initial_step", steps=10)


def test_sd_scripts_noise_and_loss_options_train_and_are_recorded(data, tmp_path):
    "The DDPM noise/loss flags reach a real run (finite loss, a trained LoRA) and its sd-scripts metadata."
    flags = ("--loss_type", "smooth_l1", "--huber_schedule", "exponential", "--huber_c", "0.2", "--multires_noise_iterations", "3",
             "--noise_offset", "0.05", "--adaptive_noise_scale", "0.01", "--noise_offset_random_strength", "--ip_noise_gamma", "0.1",
             "--debiased_estimation_loss", "--zero_terminal_snr", "--v_pred_like_loss", "0.1")
    with pytest.warns(UserWarning, match="--zero_terminal_snr without --v_parameterization"):
        result = run(data, tmp_path, "--output_name", "x", *flags, steps=2)
    assert all(torch.isfinite(torch.tensor(h[2])) for h in result.history)
    meta = load_lora(tmp_path / "x.safetensors")[1]
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"], meta["ss_multires_noise_iterations"]) == ("smooth_l1", "exponential", "0.2", "3")
    assert (meta["ss_zero_terminal_snr"], meta["ss_debiased_estimation"], meta["ss_ip_noise_gamma"]) == ("True", "True", "0.1")


def test_sd3_refuses_the_ddpm_noise_and_loss_options(tmp_path):
    from lora_kit.config import ConfigError
    from lora_kit.runtime.checks import check_all
    write_folder(tmp_path / "img" / "1_sks", n=1, seed=0)
    argv = lambda model, module: ["--pretrained_model_name_or_path", model, "--network_module", module, "--train_data_dir",
                                  str(tmp_path / "img"), "--resolution", "64", "--output_dir", str(tmp_path / "out"),
                                  "--noise_offset", "0.1", "--min_snr_gamma", "5", "--loss_type", "l1"]
    with pytest.raises(ConfigError) as e: check_all(make_config(argv("tiny-sd3", "networks.lora_sd3"), check=False))
    text = str(e.value)
    assert "--noise_offset is an SD 1.x/2.x noise/loss option; sd-scripts ignores it for sd3" in text
    assert "--min_snr_gamma" in text and "--loss_type l1: lora_kit trains sd3 with l2 only" in text
    check_all(make_config(argv("tiny-sd1", "networks.lora")))       # the same options are fine for SD 1.x


def test_warmup_stable_decay_and_custom_scheduler_drive_training(data, tmp_path):
    "The lr each step trains with follows --lr_scheduler warmup_stable_decay's definition; --lr_scheduler_type replaces it."
    st = run(data, tmp_path/"wsd", "--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "0.5",
             "--lr_scheduler_min_lr_ratio", "0.1", steps=8)
    ratio = [h[4] / 1e-3 for h in st.history]
    decay = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(1, 5)]
    assert ratio == pytest.approx([0.55, 1.0, 1.0, 1.0] + decay)
    st = run(data, tmp_path/"step", "--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=3", "gamma=0.5", steps=7)
    assert [h[4] / 1e-3 for h in st.history] == pytest.approx([1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_base_weights_are_merged_before_training(data, tmp_path):
    "--base_weights with --base_weights_multiplier: at the first step the UNet equals tiny-sd1 with that LoRA merged by hand."
    from lora_kit.lora import merge_lora
    from lora_kit.families.sd import tiny_components
    from lora_kit.train import Callback
    run(data, tmp_path/"a", "--output_name", "base", steps=2)
    base = tmp_path/"a"/"base.safetensors"
    seen = {}
    class Grab(Callback):
        def on_train_start(self, state): seen.update({k: v.clone() for k, v in state.comp.denoiser.state_dict().items()})
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "64", "--network_module", "networks.lora", "--max_train_steps", "1", "--output_dir", str(tmp_path/"b"),
            "--max_data_loader_n_workers", "0", "--base_weights", str(base), "--base_weights_multiplier", "0.5"]
    train(make_config(argv), callbacks=[Grab()])
    ref = tiny_components("tiny-sd1")
    plain = {k: v.clone() for k, v in ref.denoiser.state_dict().items()}
    merge_lora(ref, load_lora(base)[0], 0.5)
    merged = ref.denoiser.state_dict()
    assert any(not torch.equal(plain[k], merged[k]) for k in plain)
    assert all(torch.allclose(seen[k], merged[k], atol=1e-6) for k in merged)
    with pytest.raises(ConfigError, match="--base_weights: file .*missing.safetensors does not exist"):
        train(make_config(argv[:-4] + ["--base_weights", str(tmp_path/"missing.safetensors")]))


def test_loraplus_groups_lrs_and_log_names(data, tmp_path):
    # --network_args LoRA+: lora_up groups at lr x ratio, logged under sd-scripts' names; the ratios land in ss_network_args
    run(data, tmp_path, "--output_name", "lp", "--logging_dir", str(tmp_path / "logs"), "--text_encoder_lr", "5e-4",
        "--network_args", "loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4", steps=2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, = (tmp_path / "logs").iterdir()
    ev = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents.*")).parent)); ev.Reload()
    lrs = {t: ev.Scalars(t)[0].value for t in ev.Tags()["scalars"] if t.startswith("lr/")}
    assert lrs == pytest.approx({"lr/unet": 1e-3, "lr/unet plus": 1.6e-2, "lr/textencoder": 5e-4, "lr/textencoder plus": 2e-3})
    _, md = load_lora(tmp_path / "lp.safetensors")
    assert json.loads(md["ss_network_args"]) == {"loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "4"}


def test_deprecated_optimizer_flags_and_no_effect_notes(data, tmp_path, capsys):
    "--use_8bit_adam / --use_lion_optimizer train with AdamW8bit / Lion, as in sd-scripts; no-effect flags print why."
    import importlib.util
    run(data, tmp_path / "8bit", "--output_name", "x", "--use_8bit_adam", "--no_half_vae", "--lowram", steps=1)
    assert load_lora(tmp_path / "8bit" / "x.safetensors")[1]["ss_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"
    out = capsys.readouterr().out
    if importlib.util.find_spec("lion_pytorch"):
        run(data, tmp_path / "lion", "--output_name", "x", "--use_lion_optimizer", steps=1)
        assert load_lora(tmp_path / "lion" / "x.safetensors")[1]["ss_optimizer"].endswith(".Lion")
    else:
        with pytest.raises(ConfigError, match="--optimizer_type Lion needs the package 'lion-pytorch'"):
            run(data, tmp_path / "lion", "--use_lion_optimizer", steps=1)
    assert "note: --no_half_vae has no effect: lora_kit always keeps the VAE in float32" in out and "note: --lowram has no effect" in out
    with pytest.raises(ConfigError, match="--use_8bit_adam and --optimizer_type exclude each other"):
        run(data, tmp_path / "bad", "--use_8bit_adam", "--optimizer_type", "AdamW", steps=1)


def test_bad_optimizer_refused_before_loading(data, tmp_path, monkeypatch):
    "An unknown optimizer or unreadable --optimizer_args is reported with the other problems, before any model loads."
    import lora_kit.train as T
    monkeypatch.setattr(T, "load_components", lambda cfg: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError) as e:
        run(data, tmp_path, "--optimizer_type", "NoSuchOpt", "--lr_scheduler_args", "power", steps=1)
    assert any("--optimizer_type 'NoSuchOpt' is unknown" in p for p in e.value.problems)


def test_validation_loss(data, tmp_path):
    """validation_split holds out images; their loss is measured every --validate_every_n_steps and at the end of each
    epoch, deterministically (same LoRA, same value), without changing the training (same losses as a run that never
    validates); the held-out images are counted in the metadata."""
    split = ("--validation_split", "0.34", "--validation_seed", "5")
    a = run(data, tmp_path / "a", "--output_name", "x", *split, "--validate_every_n_steps", "2", steps=6)
    # 3 images: 2 train (x3 repeats = 6, 3 batches per epoch), 1 validation
    assert [(s, e, k) for s, e, k, _ in a.validation] == [(2, 1, "step"), (3, 1, "epoch"), (4, 2, "step"), (6, 2, "step"), (6, 2, "epoch")]
    values = [v for *_, v in a.validation]
    assert all(math.isfinite(v) and v > 0 for v in values) and values[3] == values[4] and values[0] != values[2]
    b = run(data, tmp_path / "b", "--output_name", "x", *split, "--validate_every_n_epochs", "100", steps=6)
    assert b.validation == [] and [h[2] for h in b.history] == [h[2] for h in a.history]
    md = load_lora(tmp_path / "a" / "x.safetensors")[1]
    assert (md["ss_num_train_images"], md["ss_num_validation_images"], md["ss_validation_split"]) == ("6", "3", "0.34")


def test_tracker_and_console_log_options(data, tmp_path, monkeypatch):
    import logging
    from accelerate import Accelerator
    seen, init = [], Accelerator.init_trackers
    def spy(self, name, config=None, init_kwargs={}):
        seen.append((name, config, init_kwargs)); return init(self, name, config, init_kwargs)
    monkeypatch.setattr(Accelerator, "init_trackers", spy)
    # --wandb_run_name becomes accelerate's init_kwargs, as in sd-scripts' init_trackers; the API key is never logged
    run(data, tmp_path, "--output_name", "t", "--logging_dir", str(tmp_path / "logs"), "--wandb_run_name", "my run",
        "--wandb_api_key", "secret", "--log_tracker_name", "lk", steps=1)
    (name, config, kwargs), = seen
    assert (name, kwargs, config["wandb_run_name"]) == ("lk", {"wandb": {"name": "my run"}}, "my run") and "wandb_api_key" not in config
    # --log_tracker_config replaces them: its [tensorboard] table reaches TensorBoard's SummaryWriter
    (tmp_path / "trackers.toml").write_text('[tensorboard]\nfilename_suffix = ".lora_kit"\n')
    saved = logging.root.handlers[:], logging.root.level
    try:
        run(data, tmp_path, "--output_name", "u", "--logging_dir", str(tmp_path / "logs2"), "--wandb_run_name", "my run",
            "--log_tracker_config", str(tmp_path / "trackers.toml"), "--console_log_file", str(tmp_path / "console.log"),
            "--console_log_level", "DEBUG", steps=1)
        assert seen[1][2] == {"tensorboard": {"filename_suffix": ".lora_kit"}}
        assert next((tmp_path / "logs2").rglob("events.out.tfevents.*")).name.endswith(".lora_kit")
        # --console_log_file / --console_log_level: Python's log records go to the file, as sd-scripts' setup_logging sends them
        logging.getLogger("lora_kit.test").debug("a debug record")
        assert logging.root.level == logging.DEBUG and "a debug record\n" in (tmp_path / "console.log").read_text()
    finally:
        for h in logging.root.handlers: h.close()
        logging.root.handlers[:] = saved[0]; logging.root.setLevel(saved[1])
    with pytest.raises(ConfigError, match="--log_tracker_config: .* does not exist"):
        run(data, tmp_path, "--log_tracker_config", str(tmp_path / "none.toml"), steps=1)


def test_cpu_offload_checkpointing_needs_transformer_blocks(tmp_path):
    "UNet families refuse --cpu_offload_checkpointing before loading; SD3 (joint blocks) takes it."
    from lora_kit.config import ConfigError
    from lora_kit.runtime.checks import check_all
    write_folder(tmp_path / "img" / "1_sks", n=1, seed=0)
    argv = lambda model, module: ["--pretrained_model_name_or_path", model, "--network_module", module, "--train_data_dir",
                                  str(tmp_path / "img"), "--resolution", "64", "--output_dir", str(tmp_path / "out"),
                                  "--gradient_checkpointing", "--cpu_offload_checkpointing"]
    with pytest.raises(ConfigError) as e: check_all(make_config(argv("tiny-sd1", "networks.lora"), check=False))
    assert "--cpu_offload_checkpointing: " in str(e.value) and "drop it" in str(e.value)
    check_all(make_config(argv("tiny-sd3", "networks.lora_sd3")))

"""The GPU paths, run on the CPU: bf16 autocast, fp16 as on a GPU (float16 autocast + gradient scaler), --full_fp16,
sampling under mixed precision, caches that agree with the uncached computation, models on the device only when
needed, the VAE kept in float32, --blocks_to_swap."""
import csv

import pytest
import torch
from PIL import Image

from lora_kit.config import ConfigError, make_config
from lora_kit.lora import load_lora
from lora_kit.sample import SampleCallback
from lora_kit.toy.world import write_folder
from lora_kit.train import Callback, train

torch.set_num_threads(1)


def _cfg(tmp_path, model="tiny-sd1", *extra, steps=2):
    module = "networks.lora_sd3" if "sd3" in model else "networks.lora"
    return make_config(["--pretrained_model_name_or_path", model, "--network_module", module, "--train_data_dir", str(tmp_path / "data"),
                        "--caption_extension", ".txt", "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps),
                        "--seed", "1", "--output_dir", str(tmp_path / "out"), "--max_data_loader_n_workers", "0", *extra])


@pytest.fixture
def data(tmp_path):
    write_folder(tmp_path / "data" / "1_sks", n=2, seed=0)
    (tmp_path / "prompts.txt").write_text("a red sks --w 64 --h 48 --s 2 --d 3\na blue circle --w 32 --h 32 --s 2 --n green\n")
    return tmp_path


class Spy(Callback):
    "Records, at every step, where the models are and the autocast dtype the denoiser ran under."
    uses_models = False
    def __init__(self): self.placements, self.autocast = [], set()
    def on_train_start(self, state):
        def hook(module, args):
            if torch.is_autocast_enabled("cpu"): self.autocast.add(torch.get_autocast_dtype("cpu"))
        state.comp.denoiser.register_forward_pre_hook(hook)
    def on_step_end(self, state): self.placements.append(set(state.placement.on_device))


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd3"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_samples_under_mixed_precision(data, model, precision):
    "The README's command has --mixed_precision bf16 --sample_prompts: sampling must run under autocast and write every image."
    cfg = _cfg(data, model, "--mixed_precision", precision, "--sample_prompts", str(data / "prompts.txt"), "--sample_every_n_steps", "1")
    spy = Spy()
    train(cfg, [SampleCallback(cfg), spy], progress=False)
    files = sorted((data / "out" / "sample").glob("*.png"))
    assert len(files) == 4, files                                   # 2 prompts at steps 1 and 2 (the end)
    sizes = sorted(Image.open(f).size for f in files)
    assert sizes == [(32, 32), (32, 32), (64, 48), (64, 48)]
    assert all(min(hi - lo for lo, hi in Image.open(f).getextrema()) > 0 for f in files)   # not blank
    assert spy.autocast == {torch.bfloat16 if precision == "bf16" else torch.float16}      # training ran under autocast


def test_fp16_runs_as_on_a_gpu(data):
    "--mixed_precision fp16 on the CPU: float16 weights, float16 autocast and a gradient scaler, as accelerate does on a GPU."
    seen = {}
    class Check(Callback):
        uses_models = False
        def on_step_end(self, state):
            seen["scaler"] = state.accelerator.scaler
            seen["dtype"] = state.comp.denoiser.dtype
            seen["lora"] = {p.dtype for p in state.network.parameters()}
    state = train(_cfg(data, "tiny-sd1", "--mixed_precision", "fp16"), [Check()], progress=False)
    assert isinstance(seen["scaler"], torch.amp.GradScaler) and seen["dtype"] == torch.float16 and seen["lora"] == {torch.float32}
    assert state.step == 2 and torch.isfinite(torch.tensor(state.loss))


def test_full_fp16_steps(data):
    """--full_fp16 (LoRA weights and gradients in float16) trains: the scaler must be allowed to unscale float16
    gradients (PyTorch refuses by default). AdamW8bit keeps float32 states; PyTorch's AdamW is refused before loading."""
    state = train(_cfg(data, "tiny-sd1", "--mixed_precision", "fp16", "--full_fp16", "--optimizer_type", "AdamW8bit",
                       "--learning_rate", "1e-2", "--output_name", "f"), progress=False)
    assert state.step == 2 and {p.dtype for p in state.network.parameters()} == {torch.float16}
    lora, _ = load_lora(data / "out" / "f.safetensors")
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))   # it learned (lora_up starts at 0)
    with pytest.raises(ConfigError, match="eps is 0 in float16"):
        train(_cfg(data, "tiny-sd1", "--mixed_precision", "fp16", "--full_fp16", "--optimizer_type", "AdamW", "--output_name", "g"))


def test_vae_stays_float32_and_unrounded(data):
    "Under bf16 the VAE is never cast to bf16 and back: its weights are bit for bit what was loaded."
    from lora_kit.family import load_components
    cfg = _cfg(data, "tiny-sd1", "--mixed_precision", "bf16", "--cache_latents")
    comp = load_components(cfg)
    before = {k: v.clone() for k, v in comp.vae.state_dict().items()}
    train(cfg, comp=comp, progress=False)
    assert comp.vae.dtype == torch.float32 and comp.denoiser.dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) for k, v in comp.vae.state_dict().items())


def test_models_on_the_device_only_when_needed(data, monkeypatch):
    """With every cache the steps keep only the denoiser on the device, sampling brings the VAE; the text encoder is
    freed: the sample prompts were encoded once, before it left, and sampling runs no text encoder."""
    import lora_kit.sample as S
    cfg = _cfg(data, "tiny-sd1", "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only",
               "--sample_prompts", str(data / "prompts.txt"), "--sample_every_n_steps", "1")
    during_sampling, generate = [], S.generate
    def spy_generate(comp, *a, **kw):
        during_sampling.append(set(state_holder[0].placement.on_device))
        return generate(comp, *a, **kw)
    monkeypatch.setattr(S, "generate", spy_generate)
    state_holder, spy = [], Spy()
    class Hold(Callback):
        uses_models = False
        def on_train_start(self, state): state_holder.append(state)
    state = train(cfg, [Hold(), SampleCallback(cfg), spy], progress=False)
    assert spy.placements == [{"denoiser"}, {"denoiser"}]
    assert during_sampling == [{"denoiser", "vae"}] * 2
    assert state.comp.text_encoders == [None] and state.comp.vae is not None   # the VAE stays for sampling (on the CPU)
    assert len(list((data / "out" / "sample").glob("*.png"))) == 4


def test_text_encoders_train_without_caches(data):
    "Without caches every step runs the VAE and the (trained) text encoder: all stay on the device."
    spy = Spy()
    train(_cfg(data, "tiny-sd1", "--output_name", "n"), [spy], progress=False)
    assert spy.placements == [{"denoiser", "vae", "text_encoder1"}] * 2


def _sd3_losses(tmp_path, name, *flags):
    train(_cfg(tmp_path, "tiny-sd3", "--mixed_precision", "bf16", "--output_name", name, *flags, steps=3), progress=False)
    return [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "out" / f"{name}_loss.csv"))]


def test_sd3_partial_text_cache_under_bf16(data):
    """SD3's partial cache (T5 cached, CLIP-L/G LoRA trained) under bf16: the cache is made under autocast like a step,
    so it runs (it crashed with a dtype mismatch) and trains exactly like the uncached run."""
    cached = _sd3_losses(data, "c", "--cache_text_encoder_outputs", "--cache_latents")
    plain = _sd3_losses(data, "p", "--cache_latents")
    assert cached == plain


def test_sd3_full_text_cache_agrees_with_uncached_bf16(data):
    "A full text cache under bf16 gives exactly the losses of the uncached run."
    cached = _sd3_losses(data, "fc", "--cache_text_encoder_outputs", "--cache_latents", "--network_train_unet_only")
    plain = _sd3_losses(data, "fp", "--cache_latents", "--network_train_unet_only")
    assert cached == plain


def test_blocks_to_swap_trains_identically(data):
    """--blocks_to_swap keeps blocks in CPU memory, each brought to the device for its forward (and its recomputation in
    the backward pass); the LoRA trained is exactly the one without it."""
    arrivals = []
    class Count(Callback):
        uses_models = False
        def on_step_end(self, state):
            forward = state.comp.denoiser.transformer_blocks[-1].forward      # wrapped by the BlockSwap while training
            arrivals.append(forward.func.__self__.peak if hasattr(forward, "func") else 0)
    run = lambda name, *f: train(_cfg(data, "tiny-sd3", "--gradient_checkpointing", "--output_name", name, *f, steps=2),
                                 [Count()], progress=False)
    run("noswap"); run("swap", "--blocks_to_swap", "1")
    assert arrivals[:2] == [0, 0] and min(arrivals[2:]) > 0
    a, _ = load_lora(data / "out" / "noswap.safetensors")
    b, _ = load_lora(data / "out" / "swap.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_readme_command_writes_samples_under_bf16(data):
    """The README's train_network command, as written (bf16, --sample_prompts, AdamW8bit, gradient checkpointing), on the
    tiny model with a small dataset: paths, resolution and epochs replaced, nothing else. It writes every sample image."""
    import re, shlex, subprocess, sys
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Using it\n\n```sh\n(.*?)```", readme, re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))[1:]
    assert argv[0] == "train_network" and "--mixed_precision" in argv and argv[argv.index("--mixed_precision") + 1] == "bf16"
    put = {"--pretrained_model_name_or_path": "tiny-sd1", "--train_data_dir": str(data / "data"), "--resolution": "64",
           "--output_dir": str(data / "out"), "--max_train_epochs": "2", "--sample_prompts": str(data / "prompts.txt"),
           "--logging_dir": str(data / "logs")}
    for flag, value in put.items(): argv[argv.index(flag) + 1] = value
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", *argv], capture_output=True, text=True,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: sampling" not in r.stdout + r.stderr
    files = sorted(p.name for p in (data / "out" / "sample").glob("*.png"))
    assert len(files) == 2 * 2, files                     # 2 prompts after epoch 1 and at the end (epoch 2)
    assert (data / "out" / "mylora.safetensors").is_file()


def _fp8_layers(model) -> tuple[int, int]:
    "(float8 Linear/Conv layers, all Linear/Conv layers) of `model`."
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return sum(m.weight.dtype == torch.float8_e4m3fn for m in layers), len(layers)


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd3"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fp8_base_trains_and_samples(data, model, precision):
    """--fp8_base: the frozen denoiser (and SD 1.x's CLIP, SD3's T5; not CLIP-L/G) stay in float8 through training and
    sampling; steps compute under autocast; the LoRA learns, is finite, and the samples are drawn; metadata says so."""
    seen = []
    class Check(Callback):
        uses_models = False
        def on_step_end(self, state):
            seen.append([_fp8_layers(m) for m in [state.comp.denoiser, *state.comp.text_encoders]])
    cfg = _cfg(data, model, "--mixed_precision", precision, "--fp8_base", "--optimizer_type", "AdamW8bit", "--learning_rate", "1e-2",
               "--sample_prompts", str(data / "prompts.txt"), "--sample_every_n_steps", "2", "--output_name", "f8", steps=3)
    state = train(cfg, [SampleCallback(cfg), Check()], progress=False)
    fp8 = {"tiny-sd1": [True, True], "tiny-sd3": [True, False, False, True]}[model]
    for step in seen:
        assert [n > 0.8 * total for n, total in step] == fp8, step       # all but the first layer (and T5's `wo`)
    assert state.comp.denoiser.dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
    lora, md = load_lora(data / "out" / "f8.safetensors")
    assert all(torch.isfinite(v).all() for v in lora.values()) and md["ss_fp8_base"] == "True"
    assert any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))
    assert len(list((data / "out" / "sample").glob("*.png"))) == 4


def test_fp8_base_unet_keeps_text_encoders(data):
    seen = {}
    class Check(Callback):
        uses_models = False
        def on_step_end(self, state): seen["te"] = _fp8_layers(state.comp.text_encoders[0])[0]; seen["unet"] = _fp8_layers(state.comp.denoiser)[0]
    train(_cfg(data, "tiny-sd1", "--mixed_precision", "bf16", "--fp8_base_unet"), [Check()], progress=False)
    assert seen["te"] == 0 and seen["unet"] > 0


def test_fp8_base_needs_mixed_precision(data):
    with pytest.raises(ConfigError, match="--fp8_base needs --mixed_precision bf16 or fp16"):
        train(_cfg(data, "tiny-sd1", "--fp8_base"), progress=False)


def test_fp8_base_with_block_swap_and_caches_stays_close_to_bf16(data):
    "SD3 with --fp8_base, --blocks_to_swap and both caches trains; its losses stay near the bf16 run's (e4m3 keeps ~2 digits)."
    flags = ["--mixed_precision", "bf16", "--blocks_to_swap", "1", "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only"]
    losses = {}
    for name, extra in [("b", []), ("e", ["--fp8_base"])]:
        train(_cfg(data, "tiny-sd3", *flags, *extra, "--output_name", name, steps=3), progress=False)
        losses[name] = [float(r["loss"]) for r in csv.DictReader(open(data / "out" / f"{name}_loss.csv"))]
    assert losses["e"] != losses["b"] and losses["e"] == pytest.approx(losses["b"], rel=0.1)


def test_sd3_partial_cache_encodes_t5_in_eval_mode(data):
    """SD3's partial cache (--cache_text_encoder_outputs while CLIP-L/G train) with --gradient_checkpointing: T5 carries no
    LoRA and stays in eval mode, so its cached outputs are those of an eval-mode encode, not one random dropout mask
    (T5's dropout is 0.1) frozen per caption for the whole run."""
    got = {}
    class Grab(Callback):                                           # (callbacks see every model in eval mode)
        def on_train_start(self, state):
            cap, cached = next(iter(state.run.datasets[0].text_cond.items()))
            with torch.no_grad(): want = state.comp.family.encode_text(state.comp, [cap])["context"][0]
            got.update(cached=cached["context"], want=want, t5=state.comp.text_encoders[2])
        def on_step_end(self, state): got["training"] = [te.training for te in state.comp.text_encoders]
    train(_cfg(data, "tiny-sd3", "--gradient_checkpointing", "--cache_text_encoder_outputs"), [Grab()], progress=False)
    assert got["t5"].config.dropout_rate > 0
    torch.testing.assert_close(got["cached"], got["want"], rtol=1e-4, atol=1e-5)
    assert got["training"] == [False] * 3                           # as a callback sees them, ...
    assert not got["t5"].training                                   # ... and T5 after training: eval mode all along

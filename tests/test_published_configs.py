"""Published sd-scripts configurations run as written, with only paths and step counts changed: kohya_ss GUI presets'
bucket settings, a Colab trainer's --config_file with keys sd-scripts ignores, and commands with abbreviated flags."""
import os

import pytest
import torch
from PIL import Image

from lora_kit.cli import main
from lora_kit.config import ConfigError, ignored_config_keys, make_config
from lora_kit.compat.dataset_config import DatasetError
from lora_kit.data import load_datasets
from lora_kit.toy.world import write_folder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "A DreamBooth folder (`2_sks`) of toy images with captions, plus a landscape and a portrait image."
    d = tmp_path_factory.mktemp("data")
    write_folder(d / "2_sks", n=4, seed=0)
    for name, size in (("wide", (96, 64)), ("tall", (64, 112))):
        Image.new("RGB", size, (200, 40, 40)).save(d / "2_sks" / f"{name}.png"); (d / "2_sks" / f"{name}.txt").write_text("sks")
    return d


def toml(path, text):
    path.write_text(text)
    return path


def gui_toml(tmp_path, data, buckets):
    """A --config_file as the kohya_ss GUI writes it (one flat table, keys sorted), with a preset's bucket settings and
    the values the GUI writes into every file: max_token_length 75, dynamo_backend "no", wandb_run_name = output_name."""
    return toml(tmp_path / "config_lora.toml", buckets + f"""caption_extension = ".txt"
dynamo_backend = "no"
epoch = 1
max_token_length = 75
network_module = "networks.lora"
noise_offset_type = "Original"
output_dir = "{tmp_path / 'out'}"
output_name = "last"
pretrained_model_name_or_path = "tiny-sd1"
train_data_dir = "{data}"
wandb_run_name = "last"
""")


# Bucket settings of kohya_ss GUI presets (presets/lora/*.json, presets/finetune/*.json), as the GUI writes them to
# the TOML: resolution is the preset's max_resolution string; numbers keep the preset's type (64.0, "1024").
PRESETS = {
    "SDXL - LoRA face dogu_cat v1.0": 'bucket_reso_steps = 32\nenable_bucket = true\nmax_bucket_reso = 2048\nmin_bucket_reso = 64\nresolution = "1024,1024"\n',
    "sd15 - LoKr v2.0": 'bucket_no_upscale = true\nbucket_reso_steps = 1\nenable_bucket = true\nmax_bucket_reso = 2048\nmin_bucket_reso = 256\nresolution = "512,512"\n',
    "sd15 - EDG_LoraOptiSettings": 'bucket_no_upscale = true\nbucket_reso_steps = 64.0\nresolution = "512,650"\n',
    "finetune/SDXL - AI_Now PagedAdamW8bit v1.0": 'bucket_reso_steps = 64\nenable_bucket = true\nmax_bucket_reso = "1024"\nmin_bucket_reso = "64"\nresolution = "1024,1024"\n',
}


@pytest.mark.parametrize("preset", PRESETS)
def test_kohya_ss_preset_bucket_settings_run(data, tmp_path, preset):
    cfg = make_config(["--config_file", str(gui_toml(tmp_path, data, PRESETS[preset]))])
    datasets, summary, _ = load_datasets(cfg)
    steps = cfg.bucket_reso_steps if cfg.enable_bucket else 1
    assert summary.buckets and all(w % steps == 0 == h % steps for w, h in summary.buckets)
    assert len(ignored_config_keys(cfg.config_file)) == 2          # epoch, noise_offset_type: kohya_ss' own keys


def test_kohya_ss_gui_config_trains_as_sd_scripts_runs_it(data, tmp_path):
    # sd-scripts takes a config file's values without argparse's choices: max_token_length 75 is its default length
    # (75 + 2 tokens), dynamo_backend "no" compiles nothing; the command line still refuses both, as argparse does.
    cfg_file = gui_toml(tmp_path, data, PRESETS["sd15 - EDG_LoraOptiSettings"].replace('"512,650"', '"64,64"'))
    argv = ["train_network", "--config_file", str(cfg_file), "--max_train_steps", "1", "--max_data_loader_n_workers", "0"]
    cfg = make_config(argv[1:])
    assert (cfg.max_token_length, cfg.dynamo_backend, cfg.wandb_run_name) == (75, "no", "last")
    assert main(argv) == 0 and (tmp_path / "out" / "last.safetensors").is_file()
    for flag, value in (("--max_token_length", "75"), ("--dynamo_backend", "no")):
        with pytest.raises(ConfigError, match=f"{flag}: .* is not one of"): make_config([*argv[1:], flag, value])


def test_bucket_settings_that_crash_sd_scripts_are_one_clear_error(data, tmp_path):
    # A preset with min_bucket_reso set to 0 or below bucket_reso_steps: sd-scripts rounds it down to 0 and stops with
    # ZeroDivisionError in make_bucket_resolutions.
    for buckets in ('bucket_reso_steps = 64\nenable_bucket = true\nmin_bucket_reso = 0\nresolution = "512,512"\n',
                    'bucket_reso_steps = 64\nenable_bucket = true\nmin_bucket_reso = 32\nresolution = "512,512"\n'):
        with pytest.raises(DatasetError) as e: load_datasets(make_config(["--config_file", str(gui_toml(tmp_path, data, buckets))]))
        assert len(e.value.problems) == 1 and "is below bucket_reso_steps" in e.value.problems[0] and "ZeroDivisionError" in e.value.problems[0]
        # with bucket_no_upscale, sd-scripts does not use min_bucket_reso: the same values run
        load_datasets(make_config(["--config_file", str(gui_toml(tmp_path, data, buckets + "bucket_no_upscale = true\n"))]))


# The example command of sd-scripts' docs/train_network.md, as posted with abbreviated flags (argparse prefix matching).
COMMAND = ["--pretrained_model_name_or_path=tiny-sd1", "--output_name=mylora", "--save_model_as=safetensors",
           "--prior_loss_weight=1.0", "--max_train_epoch=10", "--learning_rate=1e-4", "--optimizer_type=AdamW",
           "--mixed_prec=no", "--cache_latents", "--gradient_check", "--save_every_n_epoch=1", "--network_module=networks.lora",
           "--caption_extension", ".txt", "--resolution", "64"]


def test_abbreviated_flags_of_a_published_command(data, tmp_path):
    cfg = make_config([*COMMAND, "--train_data_dir", str(data), "--output_dir", str(tmp_path)])
    assert (cfg.max_train_epochs, cfg.mixed_precision, cfg.cache_latents, cfg.gradient_checkpointing, cfg.save_every_n_epochs,
            cfg.caption_extension) == (10, "no", True, True, 1, ".txt")
    assert make_config([*COMMAND, "--cache_latents_to"], check=False).cache_latents_to_disk  # --cache_latents itself is exact
    with pytest.raises(ConfigError) as e: make_config([*COMMAND, "--max_train", "10", "--caption_ext", ".txt"])
    assert e.value.problems == ["ambiguous option --max_train could match --max_train_steps, --max_train_epochs: write the flag in full",
                                "ambiguous option --caption_ext could match --caption_extension, --caption_extention: write the flag in full"]
    # sd3_train_network.py has more flags: --clip_ is --clip_skip for train_network.py only, as in sd-scripts' parsers
    assert make_config(["--clip_", "2"], check=False).clip_skip == 2
    with pytest.raises(ConfigError, match="--clip_ could match --clip_skip, --clip_l"): make_config(["--clip_", "2"], check=False, script="sd3_train_network")


def test_ambiguous_flag_stops_the_cli_before_loading(capsys):
    assert main(["train_network", "--pretrained_model_name_or_path", "tiny-sd1", "--save_every", "1"]) == 2
    assert "ambiguous option --save_every could match --save_every_n_epochs, --save_every_n_steps" in capsys.readouterr().err


def test_colab_config_with_old_keys_trains(data, tmp_path, capsys):
    # The training_config.toml of a Colab LoRA trainer (tables as in Hollowstrawberry's notebook), carrying keys that
    # sd-scripts ignores: old names of front-end scripts (lr_restart_cycles), another script's option (train_text_encoder),
    # kohya_ss' epoch, and max_train_epoch (TOML keys are not prefix-matched).
    cfg_file = toml(tmp_path / "training_config.toml", f"""[additional_network_arguments]
network_dim = 4
network_alpha = 4
network_module = "networks.lora"
network_train_unet_only = true

[optimizer_arguments]
learning_rate = 1e-3
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
optimizer_type = "AdamW"
train_text_encoder = false

[optimizer]
lr_restart_cycles = 1

[training_arguments]
max_train_steps = 2
max_train_epoch = 10
epoch = 10
train_batch_size = 2
seed = 42
max_token_length = 225
max_data_loader_n_workers = 0
mixed_precision = "no"
output_dir = "{tmp_path / 'out'}"
output_name = "colab"

[model_arguments]
pretrained_model_name_or_path = "tiny-sd1"
v2 = false

[saving_arguments]
save_model_as = "safetensors"

[dreambooth_arguments]
prior_loss_weight = 1.0

[dataset_arguments]
cache_latents = true
""")
    warnings = ignored_config_keys(cfg_file)
    assert [w.split("'")[1] for w in warnings] == ["train_text_encoder", "lr_restart_cycles", "max_train_epoch", "epoch"]
    assert "'lr_restart_cycles' in [optimizer] is not an sd-scripts option; ignored, as sd-scripts ignores it (did you mean --lr_scheduler_num_cycles?)" in warnings[1]
    # the command line resolves abbreviations and overrides the file, as in sd-scripts
    argv = ["train_network", "--config_file", str(cfg_file), "--train_data_dir", str(data), "--resolution", "64",
            "--caption_extension", ".txt", "--max_train_step", "3"]
    cfg = make_config(argv[1:])
    assert (cfg.lr_scheduler_num_cycles, cfg.max_train_epochs, cfg.max_train_steps, cfg.network_dim) == (3, None, 3, 4)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"warning: {w}" in out for w in warnings)
    assert (tmp_path / "out" / "colab.safetensors").is_file()


# Issue 27: everyday inputs sd-scripts trains on (with a warning) and lora_kit refused.
def sks_folder(root):
    "A `train/10_sks` folder of two captioned toy images under `root`; returns `root/train`."
    write_folder(root / "train" / "10_sks", n=2, seed=0)
    return root / "train"


def train_cli(tmp_path, *args, script="train_network", model="tiny-sd1"):
    return main([script, "--pretrained_model_name_or_path", model, "--resolution", "64", "--caption_extension", ".txt",
                 "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", "--max_data_loader_n_workers", "0", *args])


def test_subset_without_images_is_ignored_with_a_warning(tmp_path, capsys):
    # a dataset TOML whose first subset is the parent folder: sd-scripts prints "ignore subset with image_dir=...: no
    # images found" and trains on the second
    train = sks_folder(tmp_path)
    cfg = toml(tmp_path / "ds.toml", f'[general]\ncaption_extension = ".txt"\nresolution = 64\n[[datasets]]\n'
               f'[[datasets.subsets]]\nimage_dir = "{train}"\n[[datasets.subsets]]\nimage_dir = "{train / "10_sks"}"\n')
    assert train_cli(tmp_path, "--dataset_config", str(cfg), "--network_module", "networks.lora") == 0
    out = capsys.readouterr().out
    assert f"warning: {train}: no images" in out and "this subset is ignored" in out
    assert (tmp_path / "out" / "last.safetensors").is_file()


def test_image_without_caption_trains_with_an_empty_caption(tmp_path, capsys):
    train = sks_folder(tmp_path)
    (train / "10_sks" / "001.txt").unlink()
    cfg = toml(tmp_path / "ds.toml", f'[general]\ncaption_extension = ".txt"\nresolution = 64\n[[datasets]]\n'
               f'[[datasets.subsets]]\nimage_dir = "{train / "10_sks"}"\n')
    datasets, _, warnings = load_datasets(make_config(["--pretrained_model_name_or_path", "tiny-sd1", "--network_module", "networks.lora", "--dataset_config", str(cfg)]))
    captions = {os.path.basename(it.path): it.caption for it in datasets[0].plan.images.items}
    assert captions["001.png"] == "" and captions["000.png"]
    assert [w for w in warnings if "001.png" in w and "EMPTY caption" in w and "1 image(s) have no .txt caption file" in w]
    assert train_cli(tmp_path, "--dataset_config", str(cfg), "--network_module", "networks.lora") == 0
    assert "warning: " in capsys.readouterr().out and (tmp_path / "out" / "last.safetensors").is_file()


def test_unsafe_ckpt_is_one_line_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": print}, bad)
    for flags in (["--pretrained_model_name_or_path", str(bad)], ["--vae", str(bad)]):
        assert main(["train_network", "--pretrained_model_name_or_path", "tiny-sd1", *flags, "--train_data_dir", str(sks_folder(tmp_path)), "--resolution", "64",
                     "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"{bad} could not be read safely: it references builtins.print" in err
        assert "convert it to .safetensors where you trust the file" in err and len(err.strip().splitlines()) == 2


def test_samples_with_clip_skip_on_sd1(tmp_path):
    # diffusers' clip_skip reaches `text_encoder.text_model`, which transformers 5 removed: the samples went missing
    (tmp_path / "p.txt").write_text("a photo of sks\n")
    assert train_cli(tmp_path, "--train_data_dir", str(sks_folder(tmp_path)), "--network_module", "networks.lora", "--clip_skip", "2",
                     "--sample_prompts", str(tmp_path / "p.txt"), "--sample_every_n_steps", "1") == 0
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 1
    from lora_kit.families.sd import tiny_components
    from lora_kit.sample import SamplePrompt, prompt_conditioning
    comp = tiny_components("tiny-sd1")
    cond = prompt_conditioning(comp, comp.family.pipeline(comp), SamplePrompt("a cat", "ugly"), clip_skip=2)
    with torch.no_grad():   # the training's encoding, for the negative prompt too, as sd-scripts' sampler does
        for key, text in (("prompt_embeds", "a cat"), ("negative_prompt_embeds", "ugly")):
            assert torch.equal(cond[key], comp.family.encode_text(comp, [text], clip_skip=2)["encoder_hidden_states"])


def test_sample_prompt_that_cannot_be_encoded_stops_before_training(tmp_path, capsys, monkeypatch):
    from lora_kit.families.sd import SDFamily
    def broken(*a, **k): raise AttributeError("'CLIPTextModel' object has no attribute 'text_model'")
    monkeypatch.setattr(SDFamily, "encode_prompt", broken)
    (tmp_path / "p.txt").write_text("a photo of sks\n")
    assert train_cli(tmp_path, "--train_data_dir", str(sks_folder(tmp_path)), "--network_module", "networks.lora",
                     "--sample_prompts", str(tmp_path / "p.txt")) == 1
    err = capsys.readouterr().err
    assert "sampling cannot work, stopped before the first step: --sample_prompts" in err and "text_model" in err


def test_lora_sd3_verbose_and_clip_skip_run(tmp_path, capsys):
    assert train_cli(tmp_path, "--train_data_dir", str(sks_folder(tmp_path)), "--network_module", "networks.lora_sd3",
                     "--network_args", "verbose=True", "--clip_skip", "2", script="sd3_train_network", model="tiny-sd3") == 0
    out = capsys.readouterr().out
    assert "lora_unet_joint_blocks_0_context_block_attn_qkv" in out and "warning: --clip_skip 2 does nothing for SD3" in out
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f: md = f.metadata()
    assert md["ss_clip_skip"] == "2"          # sd-scripts writes args.clip_skip for SD3 too


def test_configs_both_refuse_have_a_cause_and_a_fix(tmp_path):
    base = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(sks_folder(tmp_path)), "--resolution", "64",
            "--output_dir", str(tmp_path / "out")]
    from lora_kit.train import check_all
    with pytest.raises(ConfigError) as e: check_all(make_config([*base, "--network_module", "lycoris.kohya", "--network_args", "algo=ia3", "preset=full"]))
    assert e.value.problems == ["--network_args algo=ia3: LyCORIS' sd-scripts wrapper (lycoris.kohya) cannot build an iA3 network "
                                "(sd-scripts stops too, in create_network); use algo=lora, locon, loha or lokr with lycoris.kohya"]
    with pytest.raises(ConfigError, match="ZeroDivisionError .*leave it out to save only at the end"):
        make_config([*base, "--network_module", "networks.lora", "--save_every_n_epochs", "0"])


def test_lycoris_lokr_on_sd35_trains_with_sd_scripts_names(tmp_path):
    # The published SD3.5 LoKr command (sd3_train_network.py --network_module lycoris.kohya): LyCORIS builds on sd-scripts'
    # MMDiT, so the file names sd-scripts' layers (joint_blocks…qkv), which ComfyUI and Forge load
    assert train_cli(tmp_path, "--train_data_dir", str(sks_folder(tmp_path)), "--network_module", "lycoris.kohya",
                     "--network_args", "algo=lokr", "preset=full", "factor=8", "--network_dim", "10000", "--network_alpha", "1",
                     "--network_train_unet_only", "--learning_rate", "1e-3", script="sd3_train_network", model="tiny-sd35m") == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
        w2 = f.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.lokr_w2")
    assert md["ss_network_module"] == "lycoris.kohya" and w2.abs().sum() > 0          # trained (LoKr starts with w2 = 0)
    for name in ("joint_blocks_0_x_block_attn_qkv", "joint_blocks_0_x_block_attn2_qkv", "joint_blocks_1_context_block_adaLN_modulation_1",
                 "t_embedder_mlp_0", "x_embedder_proj"):
        assert f"lora_unet_{name}.lokr_w1" in keys
    assert not [k for k in keys if "transformer_blocks" in k or k.startswith("lora_te")]


def test_wildcards_with_cached_text_encoder_outputs_train_with_a_warning(tmp_path, capsys):
    # sd-scripts' cache check (is_text_encoder_output_cacheable) ignores enable_wildcard, and its cache encodes each
    # image's caption as written: strategy_sd3.py cache_batch_outputs `captions = [info.caption for info in infos]`
    train = sks_folder(tmp_path)
    raw = "a {red|blue} sks\nsks on {grass|sand}"
    for txt in (train / "10_sks").glob("*.txt"): txt.write_text(raw + "\n\n")
    args = ["--train_data_dir", str(train), "--network_module", "networks.lora_sd3", "--network_train_unet_only",
            "--enable_wildcard", "--cache_text_encoder_outputs"]
    assert train_cli(tmp_path, *args, script="sd3_train_network", model="tiny-sd3") == 0
    out = capsys.readouterr().out
    assert len([l for l in out.splitlines() if "enable_wildcard with --cache_text_encoder_outputs: as in sd-scripts" in l]) == 1
    from lora_kit.families.sd3 import tiny_sd3_components
    from lora_kit.runtime.caches import cache_text_encoder_outputs
    datasets, _, _ = load_datasets(make_config(["--pretrained_model_name_or_path", "tiny-sd3", "--resolution", "64", "--caption_extension", ".txt", *args]))
    comp = tiny_sd3_components("tiny-sd3")
    ds = datasets[0]
    cache_text_encoder_outputs(ds, lambda caps: comp.family.encode_text(comp, caps), progress=False)
    assert set(ds.text_cond) == {raw}
    with torch.no_grad(): expected = comp.family.encode_text(comp, [raw])
    item = ds[(0, 1, 0)]
    assert "{" not in item["caption"]                         # the step's caption still picks (for a trained CLIP)
    for k, v in expected.items(): assert torch.allclose(item["text_cond"][k], v[0])

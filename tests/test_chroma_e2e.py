"End to end: sd-scripts' Chroma guide command (docs/flux_train_network.md, 'Training Chroma Models') trains a LoRA on tiny-chroma."
import csv

import pytest

from helpers import dataset, run_cli

# docs/flux_train_network.md: the Chroma command (--model_type chroma, no --clip_l, --guidance_scale 0.0, sigmoid timesteps,
# --apply_t5_attn_mask), with the LoRA, caching and memory flags of the FLUX guide; a --clip_l that names no file is not read.
GUIDE = """--pretrained_model_name_or_path={dit} --model_type=chroma --t5xxl={t5xxl} --ae={ae} --clip_l=/nowhere/clip_l.safetensors
  --dataset_config={toml} --output_dir={out} --output_name=my_chroma_lora --save_model_as=safetensors
  --network_module=networks.lora_flux --network_dim=16 --network_alpha=1 --learning_rate=1e-3 --optimizer_type=AdamW
  --lr_scheduler=constant --sdpa --max_train_epochs=4 --save_every_n_epochs=2 --gradient_checkpointing
  --guidance_scale=0.0 --timestep_sampling=sigmoid --model_prediction_type=raw --apply_t5_attn_mask
  --blocks_to_swap=2 --cache_text_encoder_outputs --cache_latents --sample_prompts={prompts} --sample_every_n_epochs=4"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lora_kit.families.chroma import save_chroma_files, tiny_chroma_components
    return save_chroma_files(tmp_path_factory.mktemp("chroma_models"), tiny_chroma_components())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, files):
    d = tmp_path_factory.mktemp("chroma")
    (d / "prompts.txt").write_text("a red cube --n blurry --l 4.0 --g 0 --w 64 --h 64 --s 2 --d 1\n")
    r = run_cli("flux_train_network", *GUIDE.format(toml=dataset(d), out=d / "out", prompts=d / "prompts.txt", **files).split())
    return d, r


def test_epochs_saved_samples_and_lora_learned(trained):
    from lora_kit.lora import load_lora
    d, r = trained
    out = d / "out"
    assert (out / "my_chroma_lora.safetensors").is_file() and (out / "my_chroma_lora-000002.safetensors").is_file()
    rows = list(csv.DictReader(open(out / "my_chroma_lora_loss.csv")))
    assert len(rows) == 4 and all(0 < float(r["loss"]) < 10 for r in rows)
    state, _ = load_lora(out / "my_chroma_lora.safetensors")
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_up.weight"))
    assert len(list((out / "sample").glob("my_chroma_lora_*_00_*_1.png"))) == 1      # through ChromaPipeline, true CFG
    assert "--clip_l" in r.stdout + r.stderr                                            # warned: not read


def test_kohya_keys_and_metadata(trained):
    from lora_kit.lora import load_lora
    state, md = load_lora(trained[0] / "out" / "my_chroma_lora.safetensors")
    names = {k.split(".")[0] for k in state}
    assert len(names) == 2 * 8 + 2 * 2 and all(n.startswith("lora_unet_") for n in names)   # no modulation Linears, no text encoder
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_mlp_2", "lora_unet_single_blocks_1_linear1",
            "lora_unet_single_blocks_0_linear2"} <= names
    assert not any("_mod_" in n or "modulation" in n or "distilled" in n for n in names)
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 4 * 32, 16)
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_base_model_version"] == "chroma"
    assert md["modelspec.architecture"] == "chroma/lora" and md["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert (md["ss_model_type"], md["ss_apply_t5_attn_mask"], md["ss_guidance_scale"], md["ss_timestep_sampling"]) == \
        ("chroma", "True", "0.0", "sigmoid")
    assert "modelspec.prediction_type" not in md and md["modelspec.resolution"] == "1024x1024"


def test_diffusers_copy_loads_into_chroma_pipeline(trained):
    "`lora-kit convert_flux_lora` on a Chroma LoRA: ChromaPipeline.load_lora_weights of the copy = the kohya LoRA merged."
    import torch
    from diffusers.utils import logging as dlogging
    from lora_kit.lora import count_peft_layers, load_lora
    from lora_kit.compat.flux_formats import apply_kohya_lora
    from lora_kit.families.chroma import tiny_chroma_components
    out = trained[0] / "out"
    run_cli("convert_flux_lora", str(out / "my_chroma_lora.safetensors"), str(out / "peft.safetensors"), "--pretrained_model_name_or_path", "tiny-chroma")
    state, _ = load_lora(out / "my_chroma_lora.safetensors")
    gen = lambda p: p("a red sks", negative_prompt="blurry", guidance_scale=4.0, num_inference_steps=2, height=64, width=64, output_type="pt",
                      max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images
    c = tiny_chroma_components(); pipe = c.family.pipeline(c)
    before = gen(pipe)
    dlogging.set_verbosity_error()
    pipe.load_lora_weights(str(out / "peft.safetensors"))
    m = tiny_chroma_components(); merged = m.family.pipeline(m)
    assert count_peft_layers(pipe.transformer) == apply_kohya_lora(merged, state) == 2 * 12 + 2 * 5   # fused qkv (+ mlp) split
    a, b = gen(pipe), gen(merged)
    assert not torch.allclose(a, before) and torch.allclose(a, b, atol=1e-4)


def test_builtin_trains_t5_as_lora_te3(tmp_path):
    "`tiny-chroma` with `train_t5xxl=True`: T5's LoRA is `lora_te3_` (sd-scripts' dummy CLIP-L has no Linear: no `lora_te1_`)."
    from lora_kit.lora import load_lora
    run_cli("flux_train_network", "--pretrained_model_name_or_path", "tiny-chroma", "--model_type", "chroma", "--apply_t5_attn_mask",
            "--dataset_config", str(dataset(tmp_path)), "--output_dir", str(tmp_path / "out"), "--output_name", "t",
            "--network_module", "networks.lora_flux", "--network_dim", "4", "--network_args", "train_t5xxl=True", "--max_train_steps", "2",
            "--learning_rate", "1e-3", "--guidance_scale", "0")
    state, md = load_lora(tmp_path / "out" / "t.safetensors")
    names = {k.split(".")[0] for k in state}
    te = {n for n in names if n.startswith("lora_te")}
    assert te and all(n.startswith("lora_te3_encoder_block_") for n in te)
    assert len(names - te) == 20 and md["ss_base_model_version"] == "chroma"


@pytest.mark.parametrize("flags,says", [
    (("--model_type", "flux", "--apply_t5_attn_mask"), "add --model_type chroma"),
    (("--model_type", "chroma"), "--apply_t5_attn_mask is required for Chroma"),
])
def test_chroma_file_refused_before_loading(tmp_path, files, flags, says):
    r = run_cli("flux_train_network", "--pretrained_model_name_or_path", str(files["dit"]), "--t5xxl", str(files["t5xxl"]), "--ae", str(files["ae"]),
                "--dataset_config", str(dataset(tmp_path)), "--output_dir", str(tmp_path / "o"), "--network_module", "networks.lora_flux", *flags,
                check=False)
    assert r.returncode != 0 and says in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_flux_file_with_model_type_chroma_refused(tmp_path):
    from lora_kit.families.flux import save_flux_files, tiny_flux_components
    f = save_flux_files(tmp_path / "m", tiny_flux_components())
    r = run_cli("flux_train_network", "--pretrained_model_name_or_path", str(f["dit"]), "--clip_l", str(f["clip_l"]), "--t5xxl", str(f["t5xxl"]),
                "--ae", str(f["ae"]), "--model_type", "chroma", "--apply_t5_attn_mask", "--dataset_config", str(dataset(tmp_path)),
                "--output_dir", str(tmp_path / "o"), "--network_module", "networks.lora_flux", check=False)
    assert r.returncode != 0 and "is a FLUX.1 model, not Chroma; use --model_type flux" in r.stdout + r.stderr

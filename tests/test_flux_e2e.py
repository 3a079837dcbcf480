"End to end: sd-scripts' FLUX guide command (docs/flux_train_network.md) trains a LoRA on the tiny FLUX.1 model."
import csv, subprocess, sys

import pytest
import torch

from helpers import dataset, run_cli

# docs/flux_train_network.md, section 4.1, unchanged but for the paths (AdamW8bit: bitsandbytes steps on the CPU too).
GUIDE = """--pretrained_model_name_or_path={dit} --clip_l={clip_l} --t5xxl={t5xxl} --ae={ae}
  --dataset_config={toml} --output_dir={out} --output_name=my_flux_lora --save_model_as=safetensors
  --network_module=networks.lora_flux --network_dim=16 --network_alpha=1 --learning_rate=1e-4 --optimizer_type=AdamW8bit
  --lr_scheduler=constant --sdpa --max_train_epochs=10 --save_every_n_epochs=1 --mixed_precision=fp16
  --gradient_checkpointing --guidance_scale=1.0 --timestep_sampling=flux_shift --model_prediction_type=raw
  --blocks_to_swap=18 --cache_text_encoder_outputs --cache_latents"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lora_kit.families.flux import save_flux_files, tiny_flux_components
    d = tmp_path_factory.mktemp("flux")
    files = save_flux_files(d / "models", tiny_flux_components("tiny-flux"))
    run_cli("flux_train_network", *GUIDE.format(toml=dataset(d), out=d / "out", **files).split())
    return d


def test_epochs_saved_and_lora_learned(trained):
    from lora_kit.lora import load_lora
    out = trained / "out"
    assert (out / "my_flux_lora.safetensors").is_file() and (out / "my_flux_lora-000009.safetensors").is_file()
    rows = list(csv.DictReader(open(out / "my_flux_lora_loss.csv")))
    assert len(rows) == 10 and all(0 < float(r["loss"]) < 10 for r in rows)
    state, _ = load_lora(out / "my_flux_lora.safetensors")
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_up.weight"))


def test_kohya_keys_and_metadata(trained):
    from lora_kit.lora import load_lora
    state, md = load_lora(trained / "out" / "my_flux_lora.safetensors")
    names = {k.split(".")[0] for k in state}
    unet = {n for n in names if n.startswith("lora_unet_")}
    assert len(unet) == 2 * 10 + 2 * 3       # every Linear of the 2 double + 2 single blocks, modulation included
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_mod_lin", "lora_unet_single_blocks_1_linear1",
            "lora_unet_single_blocks_0_modulation_lin"} <= unet
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names   # CLIP-L trains unless --network_train_unet_only
    assert not any(n.startswith(("lora_te3", "lora_te2", "lora_unet_final", "lora_unet_img_in")) for n in names)
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * 32, 16)
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 4 * 32, 16)
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_base_model_version"] == "flux1"
    assert md["modelspec.architecture"] == "flux-1-dev/lora" and md["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in md and md["modelspec.resolution"] == "1024x1024"
    assert (md["ss_timestep_sampling"], md["ss_model_prediction_type"], md["ss_guidance_scale"], md["ss_discrete_flow_shift"]) == \
        ("flux_shift", "raw", "1.0", "3.0")
    assert md["ss_model_type"] == "flux" and md["ss_apply_t5_attn_mask"] == "False" and md["ss_epoch"] == "10"


def test_diffusers_copy_loads_with_same_output(trained):
    from diffusers.utils import logging as dlogging
    from lora_kit.lora import count_peft_layers, load_lora
    from lora_kit.compat.flux_formats import apply_kohya_lora
    from lora_kit.families.flux import tiny_flux_components
    out = trained / "out"
    run_cli("convert_flux_lora", str(out / "my_flux_lora.safetensors"), str(out / "peft.safetensors"), "--pretrained_model_name_or_path", "tiny-flux")
    state, _ = load_lora(out / "my_flux_lora.safetensors")
    gen = lambda p: p("a red sks at the center", num_inference_steps=3, height=64, width=64, output_type="pt", max_sequence_length=32,
                      generator=torch.Generator().manual_seed(0)).images
    c = tiny_flux_components("tiny-flux"); pipe = c.family.pipeline(c)
    before = gen(pipe)
    dlogging.set_verbosity_error()
    pipe.load_lora_weights(str(out / "peft.safetensors"))
    peft_layers = count_peft_layers(pipe.transformer) + count_peft_layers(pipe.text_encoder)
    m = tiny_flux_components("tiny-flux"); merged = m.family.pipeline(m)
    assert peft_layers == apply_kohya_lora(merged, state)
    a, b = gen(pipe), gen(merged)
    assert not torch.allclose(a, before)
    assert torch.allclose(a, b, atol=1e-4)


def test_builtin_schnell_single_blocks_split_qkv(tmp_path):
    "`--pretrained_model_name_or_path tiny-flux-schnell`, network_args as lora_flux reads them: single blocks only, split q/k/v/mlp; samples."
    from PIL import Image
    from lora_kit.lora import load_lora
    (tmp_path / "prompts.txt").write_text("a red cube --w 64 --h 72 --s 2 --d 3\nsks --n blurry --l 2.5 --w 64 --h 64 --s 2\n")
    run_cli("flux_train_network", "--pretrained_model_name_or_path", "tiny-flux-schnell", "--sample_prompts", str(tmp_path / "prompts.txt"),
            "--sample_every_n_steps", "2", "--dataset_config", str(dataset(tmp_path)),
            "--output_dir", str(tmp_path / "out"), "--output_name", "s", "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--network_args", "train_blocks=single", "split_qkv=True", "--network_train_unet_only", "--max_train_steps", "2",
            "--learning_rate", "1e-3", "--timestep_sampling", "sigmoid", "--sigmoid_scale", "1.5", "--apply_t5_attn_mask")
    state, md = load_lora(tmp_path / "out" / "s.safetensors")
    names = {k.split(".")[0] for k in state}
    assert names == {f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in ("linear1", "linear2", "modulation_lin")}
    up = state["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (3 * 32 + 128, 4 * 4) and up[:32, 4:].abs().sum() == 0     # block-diagonal: q, k, v, mlp parts
    assert md["modelspec.architecture"] == "flux-1-schnell/lora" and md["ss_apply_t5_attn_mask"] == "True"
    samples = sorted((tmp_path / "out" / "sample").glob("s_000002_*.png"))      # through FluxPipeline, sizes floored to 16
    assert len(samples) == 2 and all(Image.open(f).size == (64, 64) for f in samples)


def test_refuses_what_sd_scripts_ignores(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "flux_train_network", "--pretrained_model_name_or_path", "tiny-flux",
                        "--dataset_config", str(dataset(tmp_path)), "--output_dir", str(tmp_path / "o"), "--noise_offset", "0.1",
                        "--network_module", "networks.lora_flux",
                        "--min_snr_gamma", "5"], capture_output=True, text=True)
    assert r.returncode != 0 and "--noise_offset" in r.stderr + r.stdout and "--min_snr_gamma" in r.stderr + r.stdout


def test_full_size_lora_read_by_diffusers_as_lora_kit_maps_it():
    "A FLUX.1-dev-sized kohya LoRA (rank 2, all 304 modules): diffusers' own kohya reader consumes every key, and each of its"
    "494 diffusers layers gets the update lora_kit's mapping gives (B·A, alpha folded in)."
    from types import SimpleNamespace
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from lora_kit.compat.flux_formats import flux_lora_table, kohya_pieces, lora_flux_dim
    with torch.device("meta"): tr = FluxTransformer2DModel(guidance_embeds=True)
    g, sd = torch.Generator().manual_seed(0), {}
    for name, paths, _ in flux_lora_table(19, 38, True):
        if lora_flux_dim(name, {}) == 0: continue
        layers = [tr.get_submodule(p) for p in paths]
        sd[f"{name}.lora_down.weight"] = torch.randn(2, layers[0].in_features, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(sum(m.out_features for m in layers), 2, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    assert len(sd) == 3 * 304
    theirs = FluxPipeline.lora_state_dict(dict(sd))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    ours = {p: (A, B) for _, p, A, B in kohya_pieces(sd, SimpleNamespace(transformer=tr, text_encoder=None, text_encoder_2=None))}
    assert len(ours) == 494 and len(theirs) == 2 * 494
    for p, (A, B) in ours.items():
        if not p.startswith(("transformer_blocks.0.", "single_transformer_blocks.37.")): continue   # products are slow on 2 cores
        a, b = theirs[f"transformer.{p}.lora_A.weight"].float(), theirs[f"transformer.{p}.lora_B.weight"].float()
        torch.testing.assert_close(b @ a, B @ A, rtol=1e-4, atol=1e-4)

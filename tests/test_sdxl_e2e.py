"End to end: `lora-kit sdxl_train_network` on the built-in tiny SDXL model: sd-scripts' keys and metadata, resuming, sampling, caches, and the saved file in diffusers and ComfyUI."
import csv, gzip, json, re
from pathlib import Path

import pytest
import torch

from lora_kit.toy.world import write_folder
from helpers import run_cli

GOLDEN = json.load(gzip.open(Path(__file__).parent / "golden" / "sdxl.json.gz", "rt"))   # tools/golden_sdxl.py (sd-scripts' own names)
TINY_DEPTHS = {"input_blocks_4": 1, "input_blocks_5": 1, "input_blocks_7": 2, "input_blocks_8": 2, "middle_block": 2,
               **{f"output_blocks_{i}": 2 for i in (0, 1, 2)}, **{f"output_blocks_{i}": 1 for i in (3, 4, 5)}}


def tiny_names(golden: list) -> set:
    "sd-scripts' names for the real SDXL cut to tiny-sdxl's depths: transformer layers (1 / 2 instead of 2 / 10), bigG's 4 layers."
    out = set()
    for n in golden:
        if (m := re.match(r"lora_unet_((?:input|output)_blocks_\d+|middle_block)_1_transformer_blocks_(\d+)_", n)) and int(m[2]) >= TINY_DEPTHS[m[1]]: continue
        if (m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_", n)) and int(m[1]) >= 4: continue
        out.add(n)
    return out


COMMON = ["--pretrained_model_name_or_path", "tiny-sdxl", "--network_module", "networks.lora", "--caption_extension", ".txt",
          "--resolution", "64", "--train_batch_size", "2", "--seed", "0", "--max_data_loader_n_workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "The command line: 4 steps with LoCon and a state at step 2; prompts sampled at the end."
    d = tmp_path_factory.mktemp("sdxl")
    write_folder(d / "img" / "1_sks", n=4, seed=0)
    (d / "prompts.txt").write_text("a red sks --w 64 --h 48 --s 3 --d 7\na blue sks --n green --w 32 --h 64 --s 2\n")
    r = run_cli("sdxl_train_network", *COMMON, "--train_data_dir", str(d / "img"), "--output_dir", str(d / "out"), "--output_name", "xl",
                "--network_dim", "4", "--network_alpha", "2", "--network_args", "conv_dim=4", "conv_alpha=1", "--learning_rate", "1e-3",
                "--max_train_steps", "4", "--save_state", "--save_every_n_steps", "2", "--clip_skip", "2",
                "--sample_prompts", str(d / "prompts.txt"), "--sample_every_n_steps", "100")
    assert "--clip_skip 2 does not apply to SDXL" in r.stderr + r.stdout
    return d


def test_sd_scripts_keys_and_metadata(trained):
    from lora_kit.lora import load_lora
    state, md = load_lora(trained / "out" / "xl.safetensors")
    names = {k.split(".")[0] for k in state}
    assert names == tiny_names(GOLDEN["conv"])                                     # LoCon: every name sd-scripts' create_network makes
    assert {k.split(".", 1)[1] for k in state} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert float(state["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 2.0 and float(state["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 1.0
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.startswith("lora_unet") and k.endswith("lora_up.weight"))
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and md["modelspec.prediction_type"] == "epsilon"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert md["ss_clip_skip"] == "2" and md["modelspec.resolution"] == "64x64" and md["ss_steps"] == "4"


def test_resume_continues_exactly(trained, tmp_path):
    "--resume from the step-2 state: steps 3-4 give the same LoRA as the uninterrupted run."
    from lora_kit.config import make_config
    from lora_kit.lora import load_lora
    from lora_kit.train import train
    state_dir = trained / "out" / "xl-step00000002-state"
    assert state_dir.is_dir()
    cfg = make_config([*COMMON, "--train_data_dir", str(trained / "img"), "--output_dir", str(tmp_path), "--output_name", "xl",
                       "--network_dim", "4", "--network_alpha", "2", "--network_args", "conv_dim=4", "conv_alpha=1", "--learning_rate", "1e-3",
                       "--max_train_steps", "4", "--resume", str(state_dir)], script="sdxl_train_network")
    train(cfg, progress=False)
    a, _ = load_lora(trained / "out" / "xl.safetensors")
    b, md = load_lora(tmp_path / "xl.safetensors")
    assert md["ss_steps"] == "4" and a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


def test_samples(trained):
    from PIL import Image
    files = sorted((trained / "out" / "sample").glob("*.png"))
    assert len(files) == 2
    sizes = sorted(Image.open(f).size for f in files)
    assert sizes == [(32, 64), (64, 48)] and all(min(hi - lo for lo, hi in Image.open(f).getextrema()) > 0 for f in files)


def test_loads_in_diffusers(trained):
    "StableDiffusionXLPipeline.load_lora_weights reads the kohya file (SAI names): every module becomes an adapter layer; the image changes."
    from diffusers.utils import logging as dlogging
    from lora_kit.families.sdxl import tiny_sdxl_components
    from lora_kit.lora import count_peft_layers, load_lora
    state, _ = load_lora(trained / "out" / "xl.safetensors")
    c = tiny_sdxl_components()
    pipe = c.family.pipeline(c)
    gen = lambda: pipe("a red sks", num_inference_steps=3, height=64, width=64, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    before = gen()
    dlogging.set_verbosity_error()
    pipe.load_lora_weights(str(trained / "out" / "xl.safetensors"))
    layers = count_peft_layers(pipe.unet) + count_peft_layers(pipe.text_encoder) + count_peft_layers(pipe.text_encoder_2)
    assert layers == len({k.split(".")[0] for k in state})
    assert not torch.allclose(gen(), before, atol=1e-4)


def test_comfyui_key_map_takes_every_key(trained):
    "ComfyUI's model_lora_keys_unet/_clip (comfy/lora.py) for SDXL: every saved module name is a key it maps to a model weight."
    from lora_kit.compat.sdxl_formats import comfy_unet_key_map, unet_to_sai
    from lora_kit.families.sdxl import tiny_sdxl_components
    from lora_kit.lora import load_lora
    c = tiny_sdxl_components()
    unet_map = comfy_unet_key_map("diffusion_model." + k for k in unet_to_sai(c.denoiser))
    clip_map = {}
    for i, (te, comfy) in enumerate(zip(c.text_encoders, ("clip_l", "clip_g")), 1):
        for k in te.state_dict():
            if k.endswith(".weight") and "encoder.layers." in k:
                path = k[:-len(".weight")] if k.startswith("text_model.") else "text_model." + k[:-len(".weight")]
                clip_map[f"lora_te{i}_" + path.replace(".", "_")] = f"{comfy}.transformer.{path}.weight"
    state, _ = load_lora(trained / "out" / "xl.safetensors")
    names = {k.split(".")[0] for k in state}
    assert names <= set(unet_map) | set(clip_map), sorted(names - set(unet_map) - set(clip_map))[:5]


def test_v_prediction_and_caches(tmp_path):
    """--v_parameterization --zero_terminal_snr (v-pred SDXL, no --v2) with --weighted_captions and --max_token_length 150; latents
    cached as <stem>_WxH_sdxl.npz, text outputs as sd-scripts' _te_outputs.npz (152 tokens)."""
    import numpy as np
    from lora_kit.config import make_config
    from lora_kit.lora import load_lora
    from lora_kit.train import train
    write_folder(tmp_path / "img" / "1_sks", n=2, seed=0)
    args = [*COMMON, "--train_data_dir", str(tmp_path / "img"), "--output_name", "v", "--max_train_steps", "2", "--network_train_unet_only",
            "--v_parameterization", "--zero_terminal_snr", "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk",
            "--weighted_captions", "--max_token_length", "150"]
    train(make_config([*args, "--output_dir", str(tmp_path / "a")], script="sdxl_train_network"), progress=False)
    _, md = load_lora(tmp_path / "a" / "v.safetensors")
    assert md["modelspec.prediction_type"] == "v" and md["ss_zero_terminal_snr"] == "True"
    images = sorted((tmp_path / "img" / "1_sks").glob("*.png"))
    folder = tmp_path / "img" / "1_sks"
    assert sorted(p.name for p in folder.glob("*_sdxl.npz")) == [i.stem + "_0064x0064_sdxl.npz" for i in images]
    te = sorted(folder.glob("*_te_outputs.npz"))
    assert [p.name for p in te] == [i.stem + "_te_outputs.npz" for i in images]
    with np.load(te[0]) as z:
        assert z["hidden_state1"].shape == (152, 32) and z["hidden_state2"].shape == (152, 64) and z["pool2"].shape == (64,)
        assert z["hidden_state1"].dtype == np.float32
    rows = list(csv.DictReader(open(tmp_path / "a" / "v_loss.csv")))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)


def test_block_weights_and_other_networks(tmp_path):
    "23-block network_args on SDXL names; LoRA-FA and DyLoRA keep sd-scripts' SAI names; OFT names oft_unet_<SAI path>."
    from lora_kit.config import make_config
    from lora_kit.families.sdxl import tiny_sdxl_components
    from lora_kit.networks import build_network
    base = [*COMMON, "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    mk = lambda *a: make_config([*base, *a], script="sdxl_train_network")
    dims = ",".join("0" if i in (5, 11) else "4" for i in range(23))
    net = build_network(mk("--network_args", f"block_dims={dims}", "down_lr_weight=1,1,1,1,1,1,1,0,1"), tiny_sdxl_components())
    names = set(net.loras)
    assert not any(n.startswith(("lora_unet_input_blocks_4_", "lora_unet_middle_block_1_", "lora_unet_input_blocks_7_")) for n in names)
    assert "lora_unet_input_blocks_5_1_proj_in" in names and net.block_lr_weight[0] == 1.0 and len(net.block_lr_weight) == 23
    for module in ("networks.lora_fa", "networks.dylora"):
        net = build_network(mk("--network_module", module), tiny_sdxl_components())
        assert set(net.loras) == tiny_names(GOLDEN["default"]), module
    oft = build_network(mk("--network_module", "networks.oft", "--network_dim", "2"), tiny_sdxl_components())
    assert "oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in oft.loras


def test_lycoris_gets_sd_scripts_names(tmp_path):
    "LyCORIS (lycoris.kohya) gets what sdxl_train_network.py hands it: both text encoders and the UNet under SAI paths."
    pytest.importorskip("lycoris.kohya")
    from lora_kit.config import make_config
    from lora_kit.families.sdxl import tiny_sdxl_components
    from lora_kit.train import train
    write_folder(tmp_path / "img" / "1_sks", n=2, seed=0)
    cfg = make_config([*COMMON, "--train_data_dir", str(tmp_path / "img"), "--output_dir", str(tmp_path / "o"), "--output_name", "ly",
                       "--network_module", "lycoris.kohya", "--network_args", "algo=locon", "conv_dim=4", "--max_train_steps", "1"],
                      script="sdxl_train_network")
    train(cfg, comp=tiny_sdxl_components(), progress=False)
    from lora_kit.lora import load_lora
    state, _ = load_lora(tmp_path / "o" / "ly.safetensors")
    assert {k.split(".")[0] for k in state} == tiny_names(GOLDEN["conv"])       # the names of sd-scripts' own LoCon


def test_changing_captions_refused_with_text_cache(tmp_path):
    "--cache_text_encoder_outputs with captions that change per step (shuffle_caption, ...) is refused before loading, as sd-scripts asserts."
    from lora_kit.config import make_config
    from lora_kit.data import DatasetError, load_datasets
    write_folder(tmp_path / "img" / "1_sks", n=2, seed=0)
    cfg = make_config([*COMMON, "--train_data_dir", str(tmp_path / "img"), "--output_dir", str(tmp_path / "o"), "--network_train_unet_only",
                       "--cache_text_encoder_outputs", "--shuffle_caption"], script="sdxl_train_network")
    with pytest.raises(DatasetError, match="--cache_text_encoder_outputs cannot be used when captions change per step"):
        load_datasets(cfg)

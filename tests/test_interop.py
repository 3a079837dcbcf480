"Cross-module interop: sd-scripts LoRA files via --network_weights, `lora-kit convert` / `merge`, training from a single file."
import os, subprocess, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_kit.cli import main
from lora_kit.config import TrainConfig
from lora_kit.lora import LoRANetwork, dims_from_state, load_into, load_lora, save_lora
from lora_kit.families.sd import save_model, tiny_components
from lora_kit.family import load_components
from lora_kit.toy.world import write_folder
from lora_kit.train import build_network

torch.set_num_threads(1)


def sd_scripts_lora(comp, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, dtype=torch.float16):
    """A LoRA named by sd-scripts' rules (networks/lora.py create_modules), written independently of lora_kit:
    `lora_unet_` + module path in Transformer2DModel (+ ResnetBlock2D/Downsample2D/Upsample2D 3x3 convs with conv_dim),
    `lora_te_` + `text_model.` path in CLIPAttention/CLIPMLP, dots -> underscores; Linear and 1x1 Conv2d get `dim`,
    3x3 convs `conv_dim`; alpha saved as a scalar tensor; everything in the save precision."""
    g, out = torch.Generator().manual_seed(0), {}
    te = comp.text_encoders[0]
    roots = [("lora_unet", comp.denoiser, "", ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")),
             ("lora_te", getattr(te, "text_model", te), "text_model.", ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"))]
    for prefix, root, pp, classes in roots:
        for name, module in root.named_modules():
            if type(module).__name__ not in classes: continue
            for child_name, child in module.named_modules():
                if type(child).__name__ not in ("Linear", "Conv2d"): continue
                conv3 = type(child).__name__ == "Conv2d" and child.kernel_size != (1, 1)
                d, a = (conv_dim, conv_alpha) if conv3 else (dim, alpha)
                key = f"{prefix}.{pp}{name}.{child_name}".replace(".", "_")
                if type(child).__name__ == "Linear":
                    down, up = (d, child.in_features), (child.out_features, d)
                else:
                    down, up = (d, child.in_channels, *child.kernel_size), (child.out_channels, d, 1, 1)
                out[f"{key}.lora_down.weight"] = torch.randn(down, generator=g).to(dtype)
                out[f"{key}.lora_up.weight"] = torch.randn(up, generator=g).to(dtype)
                out[f"{key}.alpha"] = torch.tensor(a).to(dtype)
    return out


def test_sd_scripts_file_loads_with_network_weights_bit_exactly(tmp_path):
    for name in ("tiny-sd1", "tiny-sd2"):
        comp = tiny_components(name)
        state = sd_scripts_lora(comp)
        f = tmp_path / f"{name}.safetensors"
        save_file(state, f, {"ss_network_module": "networks.lora"})
        cfg = TrainConfig(pretrained_model_name_or_path=name, v2=name != "tiny-sd1", network_module="networks.lora",
                          network_weights=str(f))
        net = build_network(cfg, comp)
        ours = net.state_dict()
        assert set(ours) == set(state)
        assert all(torch.equal(ours[k].to(state[k].dtype), state[k]) for k in state)
        save_lora(ours, tmp_path / "again.safetensors", dtype=torch.float16)
        again = load_file(tmp_path / "again.safetensors")
        assert all(torch.equal(again[k], state[k]) for k in state)


def _outputs(comp):
    torch.manual_seed(0)
    with torch.no_grad():
        emb = comp.family.encode_text(comp, ["a red circle"])["encoder_hidden_states"]
        return emb, comp.denoiser(torch.randn(1, 4, 8, 8), torch.tensor([500]), emb).sample


def test_cli_convert_round_trip_and_merge(tmp_path):
    comp = tiny_components("tiny-sd1")
    state = {k: v.float() for k, v in sd_scripts_lora(comp, dtype=torch.float32).items()}
    state = {k: v * 0.05 if "lora_up" in k else v for k, v in state.items()}
    save_lora(state, tmp_path / "k.safetensors", {"ss_base_model_version": "sd_v1"})
    assert main(["convert", "--to", "diffusers", str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors")]) == 0
    assert any(k.endswith(".lora_A.weight") for k in load_file(tmp_path / "d.safetensors"))
    assert main(["convert", "--to", "kohya", str(tmp_path / "d.safetensors"), str(tmp_path / "k2.safetensors")]) == 0
    back, _ = load_lora(tmp_path / "k2.safetensors")
    assert set(back) == set(state)
    # merge at strength 0.5 == model + LoRA at multiplier 0.5
    save_model(tiny_components("tiny-sd1"), tmp_path / "base.safetensors")
    assert main(["merge", "--model", str(tmp_path / "base.safetensors"), "--lora", f"{tmp_path / 'k2.safetensors'}:0.5",
                 "--output", str(tmp_path / "merged.safetensors")]) == 0
    merged = load_components(TrainConfig(pretrained_model_name_or_path=str(tmp_path / "merged.safetensors")))
    ref = tiny_components("tiny-sd1")
    dims, alphas = dims_from_state(state)
    net = LoRANetwork(ref.family.lora_targets(ref, conv=True), dims=dims, alphas=alphas)
    load_into(net, state); net.set_multiplier(0.5); net.apply_to()
    for a, b in zip(_outputs(merged), _outputs(ref)):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert not torch.allclose(_outputs(tiny_components("tiny-sd1"))[1], _outputs(ref)[1], atol=1e-3)


def test_train_from_single_file_offline(tmp_path):
    save_model(tiny_components("tiny-sd2"), tmp_path / "tiny.safetensors")
    write_folder(tmp_path / "data" / "2_sks", n=2, seed=0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty_cache"))
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "train_network", "--pretrained_model_name_or_path",
                        str(tmp_path / "tiny.safetensors"), "--v2", "--train_data_dir", str(tmp_path / "data"),
                        "--resolution", "64", "--train_batch_size", "2", "--network_module", "networks.lora",
                        "--network_dim", "4", "--max_train_steps", "2", "--output_dir", str(tmp_path / "out"),
                        "--output_name", "sf", "--max_data_loader_n_workers", "0", "--caption_extension", ".txt"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    _, md = load_lora(tmp_path / "out" / "sf.safetensors")
    assert md["ss_base_model_version"] == "sd_v2"
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "train_network", "--pretrained_model_name_or_path",
                        str(tmp_path / "tiny.safetensors"), "--train_data_dir", str(tmp_path / "data"), "--resolution", "64",
                        "--network_module", "networks.lora", "--output_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "is an SD 2.x model: add --v2" in r.stderr

"sd-scripts' network modules and optimizers people publish configurations for: LyCORIS, schedule-free optimizers."
import json

import pytest
import torch

from lora_kit.config import make_config
from lora_kit.lora import load_lora
from lora_kit.toy.world import write_folder
from lora_kit.train import Callback, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_folder(d / "3_sks", n=3, seed=0)
    return d


def run(data, out, *extra, steps=3, callbacks=()):
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "64", "--train_batch_size", "2", "--network_module", "networks.lora", "--network_dim", "4",
            "--learning_rate", "1e-2", "--max_train_steps", str(steps), "--seed", "1", "--max_data_loader_n_workers", "0",
            "--output_dir", str(out), "--output_name", "x", *extra]
    return train(make_config(argv), list(callbacks))


class Modes(Callback):
    "Records the schedule-free optimizer's mode at each event and the LoRA weights it saves."
    def __init__(self): self.seen = []
    def on_step_end(self, state): self.seen.append(state.optimizer.optimizer.param_groups[0]["train_mode"])
    def on_save(self, state, path): self.saved = {k: v.clone() for k, v in state.network.state_dict().items()}


def test_schedule_free_samples_and_saves_the_averaged_weights(data, tmp_path):
    modes = Modes()
    state = run(data, tmp_path, "--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine", callbacks=[modes])
    opt = state.optimizer.optimizer
    assert type(opt).__name__ == "AdamWScheduleFree" and opt.param_groups[0]["train_mode"]   # training mode between events
    assert modes.seen == [False] * 3                                  # callbacks (sampling) see eval mode
    saved, _ = load_lora(tmp_path / "x.safetensors")
    assert all(torch.allclose(saved[k], v, atol=1e-6) for k, v in modes.saved.items())
    train_weights = state.network.state_dict()
    assert any(not torch.equal(saved[k], train_weights[k]) for k in saved if "lora_up" in k)   # averaged != training weights
    opt.eval()
    assert all(torch.allclose(saved[k], v, atol=1e-6) for k, v in state.network.state_dict().items())


# ComfyUI (comfy/lora.py `load_lora`, comfy/weight_adapter) and Forge (packages_3rdparty/comfyui_lora_collection/lora.py)
# consume these suffixes of a module's keys; AUTOMATIC1111's network_hada/network_lokr read the same names.
LOADED_SUFFIXES = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"},
                   "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"}}
# LyCORIS' names beyond networks.lora's targets, and their original-layout modules: ComfyUI's `unet_to_diffusers`
# (UNET_MAP_BASIC) and A1111's `convert_diffusers_name_to_compvis` map them to these.
EXTRA_TARGETS = {"lora_unet_conv_in": "input_blocks.0.0", "lora_unet_conv_out": "out.2",
                 "lora_unet_time_embedding_linear_1": "time_embed.0", "lora_unet_time_embedding_linear_2": "time_embed.2"}
# LyCORIS 3's preset "full": 4.1's own "full" names time_embedding twice on SD 1.x/2.x UNets (see nbs/03b_networks.ipynb)
FULL_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
"""


def _outputs(comp):
    torch.manual_seed(0)
    with torch.no_grad():
        emb = comp.family.encode_text(comp, ["a red circle"])["encoder_hidden_states"]
        return emb, comp.denoiser(torch.randn(1, 4, 8, 8), torch.tensor([500]), emb).sample


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_file_loads_back_in_lycoris_and_the_image_tools(algo, data, tmp_path):
    import lycoris.kohya
    from lora_kit.lora import LoRANetwork
    from lora_kit.families.sd import tiny_components
    from lora_kit.networks import sd_scripts_text_encoder
    (tmp_path / "full.toml").write_text(FULL_PRESET)
    state = run(data, tmp_path, "--network_module", "lycoris.kohya", "--network_args", f"algo={algo}", f"preset={tmp_path / 'full.toml'}",
                "conv_dim=4", "conv_alpha=1")
    f = tmp_path / "x.safetensors"
    saved, md = load_lora(f)
    assert md["ss_network_module"] == "lycoris.kohya" and json.loads(md["ss_network_args"])["algo"] == algo
    names = {k.split(".", 1)[0] for k in saved}
    assert any("resnets_0_conv1" in n for n in names) and "lora_unet_time_embedding_linear_1" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    # LyCORIS itself rebuilds the network from the file on a fresh model: every key used, the same outputs
    state.network.eval()
    trained = _outputs(state.comp)
    comp = tiny_components("tiny-sd1")
    base = _outputs(comp)
    te = sd_scripts_text_encoder(comp.text_encoders[0])
    net, sd = lycoris.kohya.create_network_from_weights(1.0, str(f), comp.vae, te, comp.denoiser)
    net.apply_to(te, comp.denoiser, True, True)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    assert {m.lora_name for m in net.loras} == names
    theirs = _outputs(comp)
    assert (trained[1] - base[1]).abs().max() > 1e-4 and (trained[0] - base[0]).abs().max() > 1e-4   # the training changed both
    for a, b in zip(theirs, trained): assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # ComfyUI / Forge / A1111: every module is one networks.lora (LoCon) names, whose targets nbs/03_lora.ipynb checks
    # against those tools, or one of LyCORIS' extra names; every key suffix is one their loaders consume
    ours = tiny_components("tiny-sd1")
    locon = set(LoRANetwork(ours.family.lora_targets(ours, conv=True), dim=1, conv_dim=1).loras)
    assert names <= locon | set(EXTRA_TARGETS) and names & set(EXTRA_TARGETS) == set(EXTRA_TARGETS)
    assert {k.split(".", 1)[1] for k in saved} <= LOADED_SUFFIXES[algo]


def test_sd_scripts_network_modules_train_and_save_their_format(data, tmp_path):
    from lora_kit.networks import DyLoRAModule, LoRAFAModule, OFTModule
    logged = []
    class Lrs(Callback):
        def on_step_end(self, state): logged.append(dict(state.lrs))
    for module, extra, cls in (("networks.dylora", ["--network_args", "unit=2"], DyLoRAModule),
                               ("networks.lora_fa", [], LoRAFAModule),
                               ("networks.oft", ["--network_alpha", "0.01"], OFTModule)):
        out = tmp_path / module
        first = {}
        class Before(Callback):
            def on_train_start(self, state): first.update({k: v.clone() for k, v in state.network.state_dict().items()})
        state = run(data, out, "--network_module", module, *extra, callbacks=[Before()])
        assert {type(m) for m in state.network.loras.values()} == {cls}
        saved, md = load_lora(out / "x.safetensors")
        assert md["ss_network_module"] == module and set(saved) == set(first)
        changed = {k for k in saved if not torch.equal(saved[k], first[k].to(saved[k].dtype))}
        if module == "networks.oft":
            assert all(k.startswith("oft_unet_") for k in saved) and changed == {k for k in saved if k.endswith(".oft_blocks")}
        else:   # a plain LoRA file: lora_down (frozen in LoRA-FA) / lora_up / alpha
            assert {k.split(".", 1)[1] for k in saved} == {"lora_down.weight", "lora_up.weight", "alpha"}
            trained = {k.split(".", 1)[1] for k in changed}
            assert trained == ({"lora_up.weight"} if module == "networks.lora_fa" else {"lora_down.weight", "lora_up.weight"})
    # block-wise network_args of networks.lora: a block with lr weight 0 has no LoRA, each block its own lr
    state = run(data, tmp_path / "blocks", "--network_args", "up_lr_weight=1,1,1,0,0.5", "mid_lr_weight=0.25", "--unet_lr", "1e-2",
                "--network_train_unet_only", callbacks=[Lrs()])
    saved, _ = load_lora(tmp_path / "blocks" / "x.safetensors")
    assert not any("up_blocks_1_attentions_0" in k for k in saved) and any("up_blocks_1_attentions_1" in k for k in saved)
    assert logged[0] == {"unet_block1": 1e-2, "unet_block17": 5e-3, "unet_block12": 2.5e-3}

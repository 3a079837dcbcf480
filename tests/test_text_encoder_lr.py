"""`--text_encoder_lr` per text encoder, as sd-scripts' networks take it: `networks.lora_flux` one value for CLIP-L
(`lora_te1`) and one for T5 (`lora_te3`), `networks.lora` the first value for every text encoder (and lora_kit warns
about the rest); the values reach the optimizer groups and `ss_text_encoder_lr`."""
import pytest
import torch

from lora_kit.compat.metadata import training_metadata
from lora_kit.config import make_config
from lora_kit.data import DataSummary
from lora_kit.family import check_model, load_components, model_warnings
from lora_kit.train import _lora_and_optimizer


def groups(script: str, *args: str) -> tuple[dict, object]:
    "{group name: lr} of the optimizer `train` builds for `args`, and the config."
    cfg = make_config([*args, "--network_dim", "4", "--learning_rate", "1e-3", "--optimizer_type", "AdamW"], script=script, check=False)
    comp = load_components(cfg, script)
    _, opt = _lora_and_optimizer(cfg, comp, "cpu", torch.float32)
    return {g["name"]: g["lr"] for g in opt.param_groups}, cfg, comp


def metadata(cfg, comp) -> str:
    md = training_metadata(cfg, comp.family, DataSummary(4, 0, 2, {(64, 64): 4}), 10, 5, None, "s", 0.0)
    return md["ss_text_encoder_lr"]


FLUX = ("flux_train_network", "--pretrained_model_name_or_path", "tiny-flux", "--network_module", "networks.lora_flux",
        "--network_args", "train_t5xxl=True")


def test_flux_one_lr_per_text_encoder():
    lrs, cfg, comp = groups(*FLUX, "--text_encoder_lr", "1e-4", "5e-5")
    assert lrs == {"lora_te1": 1e-4, "lora_te3": 5e-5, "lora_unet": 1e-3}, lrs     # CLIP-L, T5, the DiT (--learning_rate)
    assert model_warnings(cfg, "flux_train_network") == [] and check_model(cfg, "flux_train_network") == []   # no longer refused
    assert metadata(cfg, comp) == "[0.0001, 5e-05]"                                  # sd-scripts writes the list as given


def test_flux_one_value_for_both():
    lrs, cfg, comp = groups(*FLUX, "--text_encoder_lr", "1e-4")
    assert lrs == {"lora_te1": 1e-4, "lora_te3": 1e-4, "lora_unet": 1e-3}, lrs
    assert metadata(cfg, comp) == "[0.0001]"


SD1 = ("train_network", "--pretrained_model_name_or_path", "tiny-sd1", "--network_module", "networks.lora")


def test_sd1_takes_the_first_value_and_warns():
    lrs, cfg, comp = groups(*SD1, "--text_encoder_lr", "1e-4", "5e-5")
    assert lrs == {"lora_unet": 1e-3, "lora_te": 1e-4}, lrs
    assert [w for w in model_warnings(cfg) if "--text_encoder_lr" in w] == [
        "--text_encoder_lr 0.0001 5e-05: SD 1.x/2.x takes the first for every text encoder (networks.lora; sd-scripts: the same); 5e-05 ignored"]
    assert metadata(cfg, comp) == "0.0001"                                           # sd-scripts: the first value


@pytest.mark.parametrize("args", [(), ("--text_encoder_lr", "1e-4")])
def test_sd1_one_value_or_none(args):
    lrs, cfg, comp = groups(*SD1, *args)
    assert lrs == {"lora_unet": 1e-3, "lora_te": 1e-4 if args else 1e-3}, lrs
    assert metadata(cfg, comp) == ("0.0001" if args else "None")

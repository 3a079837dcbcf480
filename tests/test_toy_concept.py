"""The shipped toy model learns the demo's concept (a star called `sks`) through lora_kit's own trainer, measured by the
toy world's image checker; the same run with a learning rate of (almost) 0 must fail the same check (so the check can
fail). lora_kit refuses an exact 0 ("nothing to train"), so the control uses 1e-12: the LoRA's up weights stay ~0."""
import json
from pathlib import Path

import pytest
import torch

from lora_kit.cli import demo_argv, write_demo_data
from lora_kit.config import make_config
from lora_kit.families.sd import BUILTIN_FOLDERS
from lora_kit.toy.model import concept_rate, load_toy
from lora_kit.train import train

MODEL = BUILTIN_FOLDERS["toy-sd1"]
STEPS = 400


def learned(before: float, after: float) -> bool:
    "The concept shows up in at least 30 percentage points more of the concept prompts' images than without the LoRA."
    return after >= before + 0.3


@pytest.fixture(scope="module")
def base_rate() -> float:
    torch.set_num_threads(1)
    return concept_rate(load_toy())[0]


def train_concept(out: Path, **overrides) -> float:
    "Train the demo's LoRA (without sampling) and return the concept rate with it."
    torch.set_num_threads(1)
    write_demo_data(out)
    cfg = make_config(demo_argv(out, STEPS), sample_prompts=None, sample_at_first=False, sample_every_n_steps=None,
                      logging_dir=None, **overrides)
    train(cfg)
    return concept_rate(load_toy(lora=out/"demo.safetensors"))[0]


def test_toy_model_folder_is_sd15_layout_and_small():
    idx = json.loads((MODEL/"model_index.json").read_text())
    assert idx["unet"] == ["diffusers", "UNet2DConditionModel"] and idx["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert idx["vae"] == ["diffusers", "AutoencoderKL"] and idx["tokenizer"] == ["transformers", "CLIPTokenizer"]
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert len([f for f in files if f.suffix == ".safetensors"]) == 3 and not [f for f in files if f.suffix == ".bin"]
    assert sum(f.stat().st_size for f in files) <= 25_000_000


def test_base_model_does_not_know_the_concept(base_rate):
    assert base_rate <= 0.15


def test_lora_teaches_the_concept(tmp_path, base_rate):
    after = train_concept(tmp_path)
    assert learned(base_rate, after), (base_rate, after)


def test_learning_rate_zero_fails_the_check(tmp_path, base_rate):
    after = train_concept(tmp_path, learning_rate=1e-12)
    assert not learned(base_rate, after), (base_rate, after)

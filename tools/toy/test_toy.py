"""Tests of the toy world, the checker, the pretrained toy SD1 folder and (slow, opt-in) LoRA learnability.

Run: /work/main/.venv/bin/python -m pytest /work/scratch/toy -q
Model tests need /work/scratch/toy/toy-sd1 (made by pretrain.py) and are skipped without it.
The LoRA test takes a few minutes: run it with TOY_SLOW=1.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).parent))
import check  # noqa: E402
import toyworld as tw  # noqa: E402

MODEL = Path(__file__).parent / "toy-sd1"
needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="run pretrain.py first")
CAPTION = re.compile(r"^a( (small|large))? (red|yellow|green|cyan|blue|magenta) (circle|square|triangle|sks)"
                     r"( at the (top left|top right|center|bottom left|bottom right))?$")


def _torch1():
    import torch

    torch.set_num_threads(1)
    return torch


def test_samples_are_deterministic_in_seed():
    a, b, c = tw.make_samples(6, seed=3), tw.make_samples(6, seed=3), tw.make_samples(6, seed=4)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, c))


def test_captions_follow_the_template_and_hide_the_concept():
    base = tw.make_samples(100, seed=0, p_drop=0.5)
    concept = tw.make_samples(30, seed=0, concept=True)
    assert all(CAPTION.match(c) for _, c in base + concept)
    assert not any("sks" in c for _, c in base) and all(" sks" in c for _, c in concept)
    assert all(im.size == (64, 64) and im.mode == "RGB" for im, _ in base[:5])


def test_write_folder_makes_kohya_pairs(tmp_path):
    paths = tw.write_folder(tmp_path / "10_sks", n=3, seed=1)
    assert [p.name for p in paths] == ["000.png", "001.png", "002.png"]
    assert all(CAPTION.match(p.with_suffix(".txt").read_text().strip()) for p in paths)


def test_checker_reads_real_toy_images_perfectly():
    acc = check.accuracy_on_toy(150, seed=11, concept=True, p_concept=0.3)
    assert acc == {"color": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0}


def test_checker_sees_nothing_on_blank_or_grey_noise():
    blank = Image.new("RGB", (64, 64), tw.BACKGROUND)
    noise = np.clip(np.asarray(blank, dtype=np.float32) + np.random.default_rng(0).normal(0, 6, (64, 64, 1)), 0, 255)
    for img in (blank, noise.astype(np.uint8)):
        assert check.analyze(img)["shape"] is None and check.analyze(img)["color"] is None


def test_checker_survives_blur_like_a_generator_output():
    rng = __import__("random").Random(5)
    hits = n = 0
    for shapes in (tw.SHAPES, (tw.CONCEPT_SHAPE,)):
        for _ in range(40):
            sc = tw.sample_scene(rng, shapes)
            got = check.analyze(tw.render(sc).filter(ImageFilter.GaussianBlur(1.0)))
            hits += (got["shape"], got["color"]) == (sc.shape, sc.color)
            n += 1
    assert hits / n >= 0.9


@needs_model
def test_model_folder_is_sd1_layout_safetensors_and_small():
    idx = json.loads((MODEL / "model_index.json").read_text())
    assert idx["unet"] == ["diffusers", "UNet2DConditionModel"] and idx["vae"] == ["diffusers", "AutoencoderKL"]
    assert idx["text_encoder"] == ["transformers", "CLIPTextModel"] and idx["tokenizer"][1] == "CLIPTokenizer"
    assert idx["safety_checker"] == [None, None]
    weights = list(MODEL.rglob("*.safetensors"))
    assert len(weights) == 3 and not list(MODEL.rglob("*.bin"))
    assert sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file()) <= 25_000_000
    unet = json.loads((MODEL / "unet" / "config.json").read_text())
    vae = json.loads((MODEL / "vae" / "config.json").read_text())
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == 64  # latent size x VAE factor


@needs_model
def test_pipeline_follows_prompts_well_above_chance():
    _torch1()
    import evaluate as ev

    pipe = ev.load_pipeline(str(MODEL))
    res = ev.prompt_following(pipe, n_prompts=12, per_prompt=2, steps=20, guidance=5.0, seed=0)
    assert res["color"] >= 0.7 and res["shape"] >= 0.6, res  # chance: 0.17 and 0.33
    rate, hist = ev.concept_rate(pipe, ["a large red sks at the center"], 8, seed=0)
    assert rate <= 0.25, hist  # the base model does not know the concept


@pytest.mark.skipif(os.environ.get("TOY_SLOW") != "1", reason="a few CPU minutes; set TOY_SLOW=1")
@needs_model
def test_lora_learns_the_concept_and_lr0_does_not():
    _torch1()
    import evaluate as ev
    import lora_probe as lp

    rates = {}
    for lr in (0.0, lp.DEFAULTS["lr"]):
        pipe = ev.load_pipeline(str(MODEL))
        lp.train_lora(pipe, **{**lp.DEFAULTS, "lr": lr}, log=lambda m: None)
        rates[lr] = ev.concept_rate(pipe, lp.CONCEPT_PROMPTS, 4, seed=1)[0]
    assert rates[0.0] <= 0.2 and rates[lp.DEFAULTS["lr"]] >= rates[0.0] + 0.4, rates

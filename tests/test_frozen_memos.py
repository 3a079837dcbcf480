"""Frozen encoders run once per image and caption: training with the memos gives exactly the losses of training without
them, runs the VAE's encoder once per (image, flip) and the text encoders once per caption, and keeps nothing that
changes between steps."""
import csv

import pytest
import torch

import lora_kit.train
from lora_kit.config import make_config
from lora_kit.toy.world import write_folder
from lora_kit.runtime.memos import Memos, frozen_memos
from lora_kit.train import Callback, train

torch.set_num_threads(1)


def _cfg(tmp_path, name, model="tiny-sd1", *extra, steps=12, batch=1):
    module = "networks.lora_sd3" if "sd3" in model else "networks.lora"
    return make_config(["--pretrained_model_name_or_path", model, "--network_module", module, "--train_data_dir", str(tmp_path / "data"),
                        "--caption_extension", ".txt", "--resolution", "64", "--train_batch_size", str(batch), "--seed", "3",
                        "--max_train_steps", str(steps), "--output_dir", str(tmp_path / "out"), "--output_name", name,
                        "--max_data_loader_n_workers", "0", *extra])


@pytest.fixture
def data(tmp_path):
    write_folder(tmp_path / "data" / "3_sks", n=3, seed=0)
    return tmp_path


class EncoderCalls(Callback):
    "Counts the images the VAE's encoder and the captions the (first) text encoder see."
    uses_models = False
    def __init__(self): self.images, self.captions = 0, 0
    def on_train_start(self, state):
        def count(attr):
            def hook(module, args): setattr(self, attr, getattr(self, attr) + args[0].shape[0])
            return hook
        state.comp.vae.encoder.register_forward_pre_hook(count("images"))
        state.comp.text_encoders[0].register_forward_pre_hook(count("captions"))


def _run(tmp_path, name, *flags, memos=True, monkeypatch=None, **kw):
    if not memos: monkeypatch.setattr(lora_kit.train, "frozen_memos", lambda *a: Memos())
    calls = EncoderCalls()
    train(_cfg(tmp_path, name, *flags, **kw), [calls], progress=False)
    monkeypatch.undo()
    return [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "out" / f"{name}_loss.csv"))], calls


@pytest.mark.parametrize("model, flags", [("tiny-sd1", ["--network_train_unet_only", "--flip_aug"]),
                                          ("tiny-sd1", ["--network_train_unet_only", "--mixed_precision", "bf16"]),
                                          ("tiny-sd3", ["--network_train_unet_only", "--flip_aug", "--mixed_precision", "bf16"])])
def test_memos_train_exactly_as_without(data, monkeypatch, model, flags):
    kept, with_memos = _run(data, "m", model, *flags, monkeypatch=monkeypatch)
    plain, without = _run(data, "p", model, *flags, memos=False, monkeypatch=monkeypatch)
    assert kept == plain                                  # step for step: the same latents are drawn from the same moments
    assert (without.images, without.captions) == (12, 12)
    assert with_memos.images <= 3 * (2 if "--flip_aug" in flags else 1) and with_memos.captions <= 3


def test_batches_mixing_kept_and_new_images(data, monkeypatch):
    """Batches of 2 that mix kept images and new ones train as without the memos (to float rounding: a kept output was
    encoded alone, so it does not depend on the batch it came in, but differs from a batched encoding in the last bits)."""
    kept, with_memos = _run(data, "m", "tiny-sd1", "--network_train_unet_only", steps=8, batch=2, monkeypatch=monkeypatch)
    plain, _ = _run(data, "p", "tiny-sd1", "--network_train_unet_only", steps=8, batch=2, memos=False, monkeypatch=monkeypatch)
    assert with_memos.images == 3 and with_memos.captions <= 3    # 16 each without
    assert kept == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("flags, images, captions", [(["--color_aug", "--network_train_unet_only"], 12, 3),
                                                     (["--shuffle_caption", "--network_train_unet_only"], 3, 12),
                                                     ([], 3, 12)])    # a trained text encoder
def test_what_changes_is_encoded_every_step(data, monkeypatch, flags, images, captions):
    _, calls = _run(data, "c", "tiny-sd1", *flags, monkeypatch=monkeypatch)
    assert (calls.images, calls.captions) == (images, captions)


def test_validation_and_accumulation_unchanged(data, monkeypatch):
    "Validation losses (own datasets, own seed) and gradient accumulation give the same numbers with and without the memos."
    flags = ["--network_train_unet_only", "--validation_split", "0.34", "--validate_every_n_steps", "2", "--gradient_accumulation_steps", "2"]
    results = []
    for memos in (True, False):
        state = {}
        class Keep(Callback):
            uses_models = False
            def on_step_end(self, s): state["validation"] = list(s.validation)
        if not memos: monkeypatch.setattr(lora_kit.train, "frozen_memos", lambda *a: Memos())
        train(_cfg(data, f"v{memos}", "tiny-sd1", *flags, steps=6), [Keep()], progress=False)
        monkeypatch.undo()
        results.append((state["validation"], [float(r["loss"]) for r in csv.DictReader(open(data / "out" / f"v{memos}_loss.csv"))]))
    assert results[0] == results[1] and len(results[0][0]) >= 3


def test_keys_survive_data_loader_workers(data, monkeypatch):
    "Items loaded in worker processes carry the same pixel keys: each image is still encoded once."
    _, calls = _run(data, "w", "tiny-sd1", "--network_train_unet_only", "--max_data_loader_n_workers", "1", monkeypatch=monkeypatch)
    assert (calls.images, calls.captions) == (3, 3)


def test_cached_latents_and_text_leave_nothing_to_keep(data):
    memos = frozen_memos(_cfg(data, "x", "tiny-sd1", "--cache_latents", "--cache_text_encoder_outputs",
                                             "--network_train_unet_only"), [], False)
    assert memos == Memos()

"""The photo data path: an image whose latents the image memo keeps is not decoded and shrunk again (in the main
process or in loader workers), and training is the same as decoding it every time."""
import csv

import pytest
import torch

import lora_kit.train
from lora_kit import buckets
from lora_kit.runtime.memos import Memos
from lora_kit.toy.world import write_folder
from test_frozen_memos import EncoderCalls, _cfg

torch.set_num_threads(1)


@pytest.fixture
def data(tmp_path):
    write_folder(tmp_path / "data" / "3_sks", n=3, seed=0)
    return tmp_path


def _decodes(monkeypatch):
    "Count `buckets.load_image` calls, in this process and in forked loader workers."
    count, load = torch.multiprocessing.Value("l", 0), buckets.load_image
    def counted(*a, **kw):
        with count.get_lock(): count.value += 1
        return load(*a, **kw)
    monkeypatch.setattr(buckets, "load_image", counted)
    return count


def _train(data, name, workers, *flags, memos=True, monkeypatch=None):
    if not memos: monkeypatch.setattr(lora_kit.train, "frozen_memos", lambda *a: Memos())
    calls = EncoderCalls()
    cfg = _cfg(data, name, "tiny-sd1", "--network_train_unet_only", *flags)
    cfg.max_data_loader_n_workers = workers
    lora_kit.train.train(cfg, [calls], progress=False)
    return [float(r["loss"]) for r in csv.DictReader(open(data / "out" / f"{name}_loss.csv"))], calls


@pytest.mark.parametrize("workers", [0, 1])
def test_kept_images_are_not_decoded_again(data, monkeypatch, workers):
    decodes = _decodes(monkeypatch)
    kept, calls = _train(data, f"k{workers}", workers, "--flip_aug", monkeypatch=monkeypatch)
    seen = decodes.value
    assert calls.images <= 6                       # 3 images and their flips, each encoded once
    if workers == 0: assert seen == calls.images   # decoded exactly when first met
    else: assert seen <= calls.images + 2          # (+ what the worker fetched ahead before the memo kept it)
    decodes.value = 0
    plain, _ = _train(data, f"p{workers}", workers, "--flip_aug", memos=False, monkeypatch=monkeypatch)
    assert decodes.value >= 12 and kept == plain   # without the memo: every step decodes (workers fetch ahead); the same losses


def test_changing_pixels_are_decoded_every_step(data, monkeypatch):
    decodes = _decodes(monkeypatch)
    _train(data, "c", 0, "--color_aug", monkeypatch=monkeypatch)
    assert decodes.value == 12

"""Tests of the pretraining script (not part of CI: `pytest tools/toy`). The toy world, its checker and the shipped
model are tested in nbs/toy/world.ipynb, nbs/toy/model.ipynb and tests/test_toy_concept.py."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def _torch1():
    import torch

    torch.set_num_threads(1)
    return torch


def test_random_blobs_are_seeded_and_coloured():
    import pretrain

    a, b = pretrain.random_blob(random.Random(1)), pretrain.random_blob(random.Random(1))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a).std(-1) > 20).sum() > 20  # saturated pixels were drawn


def test_pretrain_resume_is_bit_identical(tmp_path):
    """A run killed mid-way and resumed from its state file ends with exactly the weights of an uninterrupted run."""
    torch = _torch1()
    import pretrain
    import toymodel as tm

    scenes = pretrain.pool_scenes(8, seed=0)
    mean, std = torch.randn(8, 4, 16, 16), torch.rand(8, 4, 16, 16) * 0.1
    tok = tm.load_tokenizer()

    def run(state_path=None, kill_at=None):
        torch.manual_seed(0)
        te, unet = tm.build_text_encoder(), tm.build_unet()

        def boom(step):
            if step == kill_at:
                raise KeyboardInterrupt

        try:
            pretrain.train_diffusion(unet, te, tok, mean, std, scenes, 0.3, steps=6, batch=2, seed=1,
                                     log=lambda m: None, checkpoint=boom, every=1, state_path=state_path,
                                     state_every=2)
        except KeyboardInterrupt:
            return None
        return unet.state_dict()

    ref = run()
    state = tmp_path / "s.pt"
    assert run(state, kill_at=5) is None and state.exists()
    resumed = run(state)
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)

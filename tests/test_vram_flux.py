"""bench/vram_plan.py on FLUX.1: the plan of a few-block FLUX-shaped model against the RSS of its real CPU training run,
and sd-scripts' block-swap split in the plan of the full-size FLUX.1 [dev]."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/"bench"))
import vram_flux, vram_plan  # noqa: E402

RUNS = vram_flux.FLUX_CHECK_RUNS


@pytest.fixture(scope="module")
def training_memory():
    proc = vram_plan.start_measuring(RUNS)
    parts = [vram_plan.training_parts(*run) for run in RUNS]
    return list(zip(parts, vram_plan.measured_increases(proc)))


@pytest.mark.parametrize("i", range(len(RUNS)))
def test_flux_training_estimate_matches_measured_rss(training_memory, i):
    parts, measured = training_memory[i]
    planned = sum(parts.values())
    assert abs(planned / measured - 1) <= 0.10, f"{RUNS[i]}: planned {planned:.0f} MiB, measured {measured:.0f} MiB ({parts})"
    assert abs((planned - parts["train step"]) / measured - 1) > 0.10     # the activations matter: weights alone would not pass


def test_flux1_dev_swap_split():
    "--blocks_to_swap 18 on FLUX.1 [dev]: 9 double + 18 single blocks off the device (sd-scripts' split)."
    from lora_kit.config import make_config
    cfg = make_config(["--pretrained_model_name_or_path", "flux1-dev"], check=False)
    with torch.device("meta"): comp = vram_flux.flux_shape_components("flux1-dev", cfg)
    swapped = vram_plan.swapped_blocks(comp, 18)
    dit = comp.denoiser
    assert swapped == [*dit.transformer_blocks[10:], *dit.single_transformer_blocks[20:]]
    with pytest.raises(SystemExit): vram_plan.swapped_blocks(comp, 36)      # 18 double: sd-scripts allows 17


def test_chroma_shape_and_its_key_mask_fused():
    "The `chroma` shape: Chroma's DiT (no modulation Linears) with T5 alone; its key-only text mask plans as a fused kernel (no N×N)."
    from lora_kit.config import make_config
    cfg = make_config(["--pretrained_model_name_or_path", "chroma", "--model_type", "chroma"], check=False)
    with torch.device("meta"): comp = vram_flux.flux_shape_components("chroma", cfg)
    assert type(comp.family).__name__ == "ChromaFamily" and len(comp.text_encoders) == 1
    assert sum(p.numel() for p in comp.denoiser.parameters()) / 1e9 == pytest.approx(8.9, abs=0.05)     # FLUX.1's 11.9B less 3.3B modulation
    q = torch.empty(1, 24, 4608, 128, device="meta")
    with vram_plan.counting() as live:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, 1, 1, 4608, dtype=torch.bool, device="meta"))
    assert live.peak < 4608 * 4608 * 24      # the N×N weights would be 4608² × 24 heads

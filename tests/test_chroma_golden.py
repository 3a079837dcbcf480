"Chroma against sd-scripts' own code (goldens recorded by tools/golden_chroma.py from sd-scripts 48d368f: library/chroma_models.py)."
import gzip, json
from pathlib import Path

import pytest
import torch

from lora_kit.loss import FluxOptions, flux_flow_loss

GOLDEN = json.load(gzip.open(Path(__file__).parent / "golden" / "chroma.json.gz", "rt"))


def inputs():
    "The recording's latents, T5 states and timesteps (tools/golden_chroma.py `inputs`)."
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(GOLDEN["latent_shape"], generator=g)
    t5_out = torch.randn(GOLDEN["latent_shape"][0], GOLDEN["t5_len"], 128, generator=g)
    return latents, t5_out, torch.tensor([500.0, 20.0])


def mask(lengths):
    return (torch.arange(GOLDEN["t5_len"])[None] < torch.tensor(lengths)[:, None]).long()


@pytest.fixture(scope="module")
def tiny():
    from lora_kit.families.chroma import tiny_chroma_components
    return tiny_chroma_components()


@pytest.mark.parametrize("g", GOLDEN["forward"], ids=lambda g: f"lengths={g['lengths']},guidance={g['guidance']}")
def test_dit_output_as_sd_scripts_chroma(g, tiny):
    "diffusers' Chroma DiT with lora_kit's mask and guidance input = sd-scripts' `Chroma` (its per-sample text cut, one padding token)."
    from lora_kit.families.chroma import chroma_predict
    latents, t5_out, t = inputs()
    with torch.no_grad(): out = chroma_predict(tiny.denoiser, latents, t, t5_out, mask(g["lengths"]), g["guidance"])
    torch.testing.assert_close(out.flatten(), torch.tensor(g["out"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("g", GOLDEN["loss"], ids=lambda g: ",".join(f"{k}={v}" for k, v in g["case"].items()))
def test_training_loss_as_flux_train_network_for_chroma(g, tiny):
    "The family's whole objective (noise, σ, the DiT with the T5 mask and `--guidance_scale`, prediction type, weighting)."
    from lora_kit.families.chroma import ChromaFamily
    latents, t5_out, _ = inputs()
    case = dict(g["case"])
    fam = ChromaFamily("chroma", guidance_scale=case.pop("guidance_scale"))
    cond = {"t5_out": t5_out, "t5_mask": mask([5, 12])}
    torch.manual_seed(7)
    with torch.no_grad():
        loss = flux_flow_loss(lambda noisy, t: fam.predict(tiny, noisy, t, cond), latents, FluxOptions(**case), sd_scripts_target=True)
    torch.testing.assert_close(loss, torch.tensor(g["loss"]), rtol=1e-4, atol=1e-6)


def test_lora_flux_modules_on_tiny_chroma(tiny):
    "networks.lora_flux with sd-scripts' dummy CLIP-L and T5 (train_t5xxl): lora_te3_ and the blocks' Linears, nothing else."
    from lora_kit.compat.flux_formats import FLUX_NETWORK_ARGS
    from lora_kit.lora import parse_network_args
    args = parse_network_args(["train_t5xxl=True"], FLUX_NETWORK_ARGS)
    ours = {(n, d or 4) for t in tiny.family.lora_targets(tiny, network_args=args) for n, (d, _) in t.dims.items()}
    assert ours == {tuple(m) for m in GOLDEN["tiny_modules"]}


def test_real_chroma_has_sd_scripts_228_modules():
    "The real Chroma's LoRA names on the meta device (no memory): the 228 sd-scripts makes, in its order."
    from diffusers import ChromaTransformer2DModel
    from lora_kit.compat.flux_formats import dit_lora_table, lora_flux_dim
    with torch.device("meta"): tr = ChromaTransformer2DModel()
    ours = [n for n, _, _ in dit_lora_table(tr) if lora_flux_dim(n, {}) != 0]
    assert len(ours) == 228 and ours == GOLDEN["chroma_names"]

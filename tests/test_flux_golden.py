"FLUX.1 against sd-scripts' own functions (goldens recorded by tools/golden_flux.py from sd-scripts 48d368f)."
import gzip, json
from pathlib import Path

import pytest
import torch

from lora_kit.loss import FluxOptions, apply_prediction_type, flux_flow_loss, flux_noisy, flux_sigmas, flux_target
from lora_kit.lora import parse_network_args

GOLDEN = json.load(gzip.open(Path(__file__).parent / "golden" / "flux.json.gz", "rt"))
LATENTS = torch.randn(GOLDEN["latent_shape"], generator=torch.Generator().manual_seed(123))


def draws(opts):
    "Noise, timesteps, sigmas and noisy input drawn as the golden run drew them (global RNG seeded 7)."
    torch.manual_seed(7)
    noise = torch.randn(LATENTS.shape)
    t, s = flux_sigmas(LATENTS.shape[0], LATENTS.shape[-2:], opts)
    return noise, t, s, flux_noisy(LATENTS, noise, s, opts)


@pytest.mark.parametrize("g", GOLDEN["sampling"], ids=lambda g: ",".join(f"{k}={v}" for k, v in g["case"].items()) or "default")
def test_timesteps_and_noisy_input(g):
    _, t, s, noisy = draws(FluxOptions(**g["case"]))
    torch.testing.assert_close(t, torch.tensor(g["timesteps"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(s, torch.tensor(g["sigmas"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(noisy.flatten(), torch.tensor(g["noisy"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("g", GOLDEN["prediction"], ids=lambda g: f"{g['case']['model_prediction_type']}-{g['case']['weighting_scheme']}")
def test_prediction_types_with_sd_scripts_target(g):
    opts = FluxOptions(**g["case"])
    pred = torch.randn(LATENTS.shape, generator=torch.Generator().manual_seed(5))
    noise, t, s, noisy = draws(opts)
    out, w = apply_prediction_type(opts.model_prediction_type, pred, noisy, s.view(-1, 1, 1, 1), opts.weighting_scheme)
    loss = (out - flux_target(opts.model_prediction_type, LATENTS, noise, noisy, sd_scripts_target=True)) ** 2
    loss = (loss * (w if w is not None else 1)).mean([1, 2, 3])
    torch.testing.assert_close(loss, torch.tensor(g["loss"]), rtol=1e-5, atol=1e-6)
    torch.manual_seed(7)      # the whole objective, in its own draw order
    whole = flux_flow_loss(lambda x, t: pred, LATENTS, opts, sd_scripts_target=True)
    torch.testing.assert_close(whole, torch.tensor(g["loss"]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    from lora_kit.families.flux import tiny_flux_components
    return tiny_flux_components()


@pytest.mark.parametrize("g", GOLDEN["networks"], ids=lambda g: ",".join(f"{k}={v}" for k, v in g["network_args"].items()) or "default")
def test_lora_flux_modules_and_ranks(g, tiny):
    from lora_kit.compat.flux_formats import FLUX_NETWORK_ARGS, flux_lora_targets
    args = parse_network_args([f"{k}={v}" for k, v in g["network_args"].items()], FLUX_NETWORK_ARGS)
    ours = {(n, d or 4) for t in flux_lora_targets(tiny, args=args) for n, (d, _) in t.dims.items()}
    assert ours == {tuple(m) for m in g["modules"]}


def test_flux1_dev_has_sd_scripts_304_modules():
    from diffusers import FluxTransformer2DModel
    from lora_kit.compat.flux_formats import flux_lora_table, lora_flux_dim
    with torch.device("meta"): tr = FluxTransformer2DModel(guidance_embeds=True)
    c = tr.config
    ours = [n for n, _, _ in flux_lora_table(c.num_layers, c.num_single_layers, True) if lora_flux_dim(n, {}) != 0]
    assert len(ours) == 304 and ours == GOLDEN["flux1_dev_names"]

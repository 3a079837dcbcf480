"""Record sd-scripts' own FLUX.1 results as goldens for tests/test_flux_golden.py.

Runs sd-scripts' functions (library/flux_train_utils.py, networks/lora_flux.py) on fixed inputs: the timesteps, sigmas
and noisy inputs of every `--timestep_sampling` for a fixed seed, the loss of every `--model_prediction_type`, and the
LoRA module names and ranks `networks.lora_flux.create_network` makes for several `network_args`, on the tiny model
and (names only, on the meta device) on FLUX.1-dev. sd-scripts' modules that this CPU environment cannot import
(torchvision, cv2, the long-prompt pipelines) are replaced by empty stand-ins; none of them is used here.

    python tools/golden_flux.py --sd_scripts /path/to/sd-scripts   # writes tests/golden/flux.json.gz
"""
import argparse, gzip, importlib.machinery, json, sys, types
from pathlib import Path


class _Anything(types.ModuleType):
    "A stand-in module whose every attribute is another stand-in (for imports sd-scripts makes but these functions never use)."
    def __getattr__(self, n):
        if n.startswith("__"): raise AttributeError(n)
        return _Anything(n)
    def __call__(self, *a, **k): return self


def import_sd_scripts(root: str):
    import transformers, diffusers  # noqa: F401  (imported before the stand-ins, whose presence they probe)
    for n in ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "imagesize", "cv2", "voluptuous",
              "library.lpw_stable_diffusion", "library.sdxl_lpw_stable_diffusion"]:
        try:
            if not n.startswith("library."): __import__(n); continue
        except Exception: pass
        m = _Anything(n); m.__spec__ = importlib.machinery.ModuleSpec(n, None); sys.modules[n] = m
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.path.insert(0, root)
    from library import flux_models, flux_train_utils, sd3_train_utils
    import networks.lora_flux as lora_flux
    return flux_models, flux_train_utils, sd3_train_utils, lora_flux


DEFAULTS = dict(timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0, model_prediction_type="sigma_scaled",
                weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, ip_noise_gamma=None,
                ip_noise_gamma_random_strength=False)
SAMPLING_CASES = [dict(), dict(weighting_scheme="logit_normal", logit_mean=0.3, logit_std=1.2), dict(weighting_scheme="mode"),
                  dict(discrete_flow_shift=1.0), dict(timestep_sampling="uniform"), dict(timestep_sampling="sigmoid", sigmoid_scale=1.5),
                  dict(timestep_sampling="shift", discrete_flow_shift=3.1582), dict(timestep_sampling="flux_shift", sigmoid_scale=1.2),
                  dict(timestep_sampling="uniform", ip_noise_gamma=0.1),
                  dict(timestep_sampling="sigmoid", ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)]
PREDICTION_CASES = [dict(model_prediction_type=k, weighting_scheme=w) for k in ("raw", "additive", "sigma_scaled")
                    for w in ("uniform", "sigma_sqrt", "cosmap")]
NETWORK_CASES = [{}, {"train_t5xxl": "True"}, {"train_blocks": "single"}, {"train_blocks": "double"}, {"in_dims": "[4,0,2,3,5]"},
                 {"img_attn_dim": "8", "single_mod_dim": "0", "train_double_block_indices": "1", "train_single_block_indices": "0"},
                 {"network_reg_dims": "txt_mlp=7,mlp=9", "train_double_block_indices": "0"}, {"single_dim": "2", "txt_mod_dim": "0"}]
LATENT_SHAPE = (3, 16, 4, 6)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sd_scripts", default="/work/sd-scripts")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "golden" / "flux.json.gz"))
    a = p.parse_args()
    import torch
    flux_models, ftu, sd3u, lora_flux = import_sd_scripts(a.sd_scripts)
    from lora_kit.families.flux import tiny_flux_components, TINY_FLUX_DIT
    from lora_kit.networks import sd_scripts_text_encoder

    latents = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(123))
    out = {"latent_shape": LATENT_SHAPE, "sampling": [], "prediction": [], "networks": []}
    for case in SAMPLING_CASES:
        args = argparse.Namespace(**{**DEFAULTS, **case})
        sched = sd3u.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.discrete_flow_shift)
        torch.manual_seed(7)
        noise = torch.randn_like(latents)
        noisy, t, s = ftu.get_noisy_model_input_and_timesteps(args, sched, latents, noise, "cpu", torch.float32)
        out["sampling"].append({"case": case, "timesteps": t.tolist(), "sigmas": s.flatten().tolist(), "noisy": noisy.flatten().tolist()})
    pred = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(5))
    for case in PREDICTION_CASES:
        args = argparse.Namespace(**{**DEFAULTS, **case})
        sched = sd3u.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.discrete_flow_shift)
        torch.manual_seed(7)
        noise = torch.randn_like(latents)
        noisy, t, s = ftu.get_noisy_model_input_and_timesteps(args, sched, latents, noise, "cpu", torch.float32)
        mp, w = ftu.apply_model_prediction_type(args, pred, noisy, s)
        loss = torch.nn.functional.mse_loss(mp.float(), (noise - latents).float(), reduction="none")   # process_batch
        if w is not None: loss = loss * w
        out["prediction"].append({"case": case, "loss": loss.mean([1, 2, 3]).tolist()})

    comp = tiny_flux_components()
    c = TINY_FLUX_DIT
    params = flux_models.FluxParams(in_channels=c["in_channels"], vec_in_dim=c["pooled_projection_dim"], context_in_dim=c["joint_attention_dim"],
                                    hidden_size=c["attention_head_dim"] * c["num_attention_heads"], mlp_ratio=4.0, num_heads=c["num_attention_heads"],
                                    depth=c["num_layers"], depth_single_blocks=c["num_single_layers"], axes_dim=list(c["axes_dims_rope"]),
                                    theta=10000, qkv_bias=True, guidance_embed=True)
    with torch.device("meta"): tiny = flux_models.Flux(params)
    for nargs in NETWORK_CASES:
        # CLIP-L under transformers 4's module names (text_model.encoder...), which sd-scripts pins and kohya files carry
        tes = [sd_scripts_text_encoder(comp.text_encoders[0]), comp.text_encoders[1]]
        net = lora_flux.create_network(1.0, 4, 1.0, None, tes, tiny, **nargs)
        out["networks"].append({"network_args": nargs, "modules": [[m.lora_name, m.lora_dim] for m in net.text_encoder_loras + net.unet_loras]})
    with torch.device("meta"): dev = flux_models.Flux(flux_models.configs["dev"].params)
    net = lora_flux.create_network(1.0, 4, 1.0, None, [None, None], dev)
    out["flux1_dev_names"] = [m.lora_name for m in net.unet_loras]
    with gzip.open(a.out, "wt") as f: json.dump(out, f)
    print(f"wrote {a.out}: {len(out['sampling'])} sampling, {len(out['prediction'])} prediction, {len(out['networks'])} network cases, "
          f"{len(out['flux1_dev_names'])} FLUX.1-dev modules")


if __name__ == "__main__":
    main()

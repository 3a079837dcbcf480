"""Record sd-scripts' own Chroma results as goldens for tests/test_chroma_golden.py.

Runs sd-scripts' `library/chroma_models.Chroma` (loaded with tiny-chroma's weights in BFL layout) on fixed inputs: its
output for two T5 masks and two guidance values, and the whole training loss as `flux_train_network.py` computes it for
chroma (`get_noisy_model_input_and_timesteps`, pack, `get_mod_vectors` + forward with the T5 mask, unpack,
`apply_model_prediction_type`, MSE against noise − latents); and the LoRA module names `networks.lora_flux` makes for
Chroma: on the tiny model with its dummy CLIP-L and T5 (`train_t5xxl`), and (names only, meta device) on the real Chroma.

    python tools/golden_chroma.py --sd_scripts /path/to/sd-scripts   # writes tests/golden/chroma.json.gz
"""
import argparse, gzip, json, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from golden_flux import DEFAULTS, import_sd_scripts   # noqa: E402

LATENT_SHAPE, T5_LEN = (2, 16, 8, 8), 12
FORWARD_CASES = [dict(lengths=[5, 12], guidance=0.0), dict(lengths=[3, 7], guidance=3.5)]
LOSS_CASES = [dict(timestep_sampling="sigmoid", model_prediction_type="raw", guidance_scale=0.0),
              dict(timestep_sampling="flux_shift", model_prediction_type="sigma_scaled", guidance_scale=3.5, weighting_scheme="sigma_sqrt")]


def inputs():
    "Fixed latents, T5 states and timesteps (the test builds the same)."
    import torch
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(LATENT_SHAPE, generator=g)
    t5_out = torch.randn(LATENT_SHAPE[0], T5_LEN, 128, generator=g)
    return latents, t5_out, torch.tensor([500.0, 20.0])


def mask(lengths):
    import torch
    return (torch.arange(T5_LEN)[None] < torch.tensor(lengths)[:, None]).long()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sd_scripts", default="/work/sd-scripts")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "golden" / "chroma.json.gz"))
    a = p.parse_args()
    import torch
    flux_models, ftu, sd3u, lora_flux = import_sd_scripts(a.sd_scripts)
    from library import chroma_models, flux_utils
    from lora_kit.families.chroma import TINY_CHROMA_DIT as c, tiny_chroma_components
    from lora_kit.compat.flux_formats import diffusers_to_bfl

    comp = tiny_chroma_components()
    params = chroma_models.ChromaParams(in_channels=c["in_channels"], context_in_dim=c["joint_attention_dim"],
                                        hidden_size=c["attention_head_dim"] * c["num_attention_heads"], mlp_ratio=4.0,
                                        num_heads=c["num_attention_heads"], depth=c["num_layers"], depth_single_blocks=c["num_single_layers"],
                                        axes_dim=list(c["axes_dims_rope"]), theta=10000, qkv_bias=True, guidance_embed=True,
                                        approximator_in_dim=c["approximator_num_channels"], approximator_depth=c["approximator_layers"],
                                        approximator_hidden_size=c["approximator_hidden_dim"], _use_compiled=False)
    model = chroma_models.Chroma(params).eval()
    model.load_state_dict(diffusers_to_bfl(comp.denoiser), strict=True)

    def run(noisy, t, t5_out, m, guidance):
        b, _, H, W = noisy.shape
        img = flux_utils.pack_latents(noisy)
        img_ids = flux_utils.prepare_img_ids(b, H // 2, W // 2)
        gv = torch.full((b,), float(guidance))
        mod = model.get_mod_vectors(timesteps=t / 1000, guidance=gv, batch_size=b)
        out = model(img=img, img_ids=img_ids, txt=t5_out, txt_ids=torch.zeros(b, t5_out.shape[1], 3), y=None, timesteps=t / 1000,
                    guidance=gv, txt_attention_mask=m, mod_vectors=mod)
        return flux_utils.unpack_latents(out, H // 2, W // 2)

    latents, t5_out, t = inputs()
    out = {"latent_shape": LATENT_SHAPE, "t5_len": T5_LEN, "forward": [], "loss": []}
    with torch.no_grad():
        for case in FORWARD_CASES:
            out["forward"].append({**case, "out": run(latents, t, t5_out, mask(case["lengths"]), case["guidance"]).flatten().tolist()})
        for case in LOSS_CASES:
            args = argparse.Namespace(**{**DEFAULTS, **case})
            sched = sd3u.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.discrete_flow_shift)
            torch.manual_seed(7)
            noise = torch.randn_like(latents)
            noisy, ts, s = ftu.get_noisy_model_input_and_timesteps(args, sched, latents, noise, "cpu", torch.float32)
            pred = run(noisy, ts, t5_out, mask([5, 12]), args.guidance_scale)
            mp, w = ftu.apply_model_prediction_type(args, pred, noisy, s)
            loss = torch.nn.functional.mse_loss(mp.float(), (noise - latents).float(), reduction="none")
            if w is not None: loss = loss * w
            out["loss"].append({"case": case, "loss": loss.mean([1, 2, 3]).tolist()})

    net = lora_flux.create_network(1.0, 4, 1.0, None, [flux_utils.dummy_clip_l(), comp.text_encoders[0]], model, train_t5xxl="True")
    out["tiny_modules"] = [[m.lora_name, m.lora_dim] for m in net.text_encoder_loras + net.unet_loras]
    with torch.device("meta"): real = chroma_models.Chroma(chroma_models.chroma_params)
    out["chroma_names"] = [m.lora_name for m in lora_flux.create_network(1.0, 4, 1.0, None, [None, None], real).unet_loras]
    with gzip.open(a.out, "wt") as f: json.dump(out, f)
    print(f"wrote {a.out}: {len(out['forward'])} forward, {len(out['loss'])} loss cases, {len(out['tiny_modules'])} tiny modules, "
          f"{len(out['chroma_names'])} Chroma modules")


if __name__ == "__main__":
    main()

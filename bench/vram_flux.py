"""FLUX.1 in bench/vram_plan.py: the `flux1-dev` / `flux1-schnell` shapes (diffusers' FluxTransformer2DModel configs of
Black Forest Labs' repos), a few-block `flux-mid` model for `--check flux`, and sd-scripts' VRAM tiers for FLUX.1
(docs/flux_train_network.md §6.1) against lora_kit's plan of the same settings.

    PYTHONPATH=. python bench/vram_plan.py --tiers flux     # the tier table
    PYTHONPATH=. python bench/vram_plan.py --check flux     # the plan against a real CPU run of flux-mid
"""
from __future__ import annotations
import torch

GiB = 2**30

# diffusers' FluxTransformer2DModel config of black-forest-labs/FLUX.1-dev (transformer/config.json); schnell: no guidance
FLUX1 = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
             joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
FLUX_SHAPES = {"flux1-dev": dict(FLUX1, guidance_embeds=True), "flux1-schnell": dict(FLUX1, guidance_embeds=False)}
# few blocks of FLUX's structure for `--check flux` (256 px -> 32x32 latents with the tiny AE, 256 image tokens)
FLUX_MID = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                joint_attention_dim=128, pooled_projection_dim=32, axes_dims_rope=(8, 28, 28), guidance_embeds=True)
FLUX_CHECK_RUNS = [("flux-mid", 256, []), ("flux-mid", 256, ["--gradient_checkpointing"])]


def is_flux_shape(name: str) -> bool: return name in FLUX_SHAPES or name in ("flux-mid", "chroma")


def flux_shape_components(name: str, cfg=None, seed: int = 0):
    """Components of a FLUX shape on the current device: `flux1-dev`/`flux1-schnell` full size (FLUX's AE, CLIP-L, T5-XXL),
    `chroma` (Chroma's DiT, FLUX's AE, T5-XXL), `flux-mid` (`FLUX_MID` with tiny-flux's AE, CLIP-L and T5, seeded)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from lora_kit.family import Components
    from lora_kit.families.flux import (CLIP_L_TEXT, FLUX_AE, FluxFamily, clip_l_encoder, flux_scheduler,
                                        tiny_flux_components)
    from lora_kit.families.sd3 import T5XXL, clip_tokenizers, t5_encoder, tiny_t5_tokenizer
    if name == "chroma":   # diffusers' ChromaTransformer2DModel defaults: lodestones' Chroma (sd-scripts' chroma_params), T5-XXL alone
        from diffusers import ChromaTransformer2DModel
        from lora_kit.families.chroma import ChromaFamily, as_sd_scripts, chroma_scheduler
        return Components(ChromaFamily.from_config("chroma", cfg), as_sd_scripts(ChromaTransformer2DModel()), AutoencoderKL(**FLUX_AE),
                          [t5_encoder(T5XXL)], [tiny_t5_tokenizer()], chroma_scheduler(), source=name)
    if name == "flux-mid":
        comp = tiny_flux_components("tiny-flux", seed, cfg)
        torch.manual_seed(seed)
        comp.denoiser = FluxTransformer2DModel(**FLUX_MID).eval()
        comp.source = name
        return comp
    variant = name.removeprefix("flux1-")
    dit = FluxTransformer2DModel(**FLUX_SHAPES[name])
    return Components(FluxFamily.from_config(variant, cfg), dit, AutoencoderKL(**FLUX_AE), [clip_l_encoder(CLIP_L_TEXT), t5_encoder(T5XXL)],
                      [clip_tokenizers()[0], tiny_t5_tokenizer()], flux_scheduler(variant), source=name)   # any T5 tokenizer: the count is padded


# --- sd-scripts' table (docs/flux_train_network.md, 6.1 "Recommended Settings by GPU Memory", all "with `--fp8_base`"):
#   | 24GB VRAM | Basic settings work fine (batch size 2) |
#   | 16GB VRAM | Set batch size to 1 and use `--blocks_to_swap` |
#   | 12GB VRAM | Use `--blocks_to_swap 16` and 8bit AdamW |
#   | 10GB VRAM | Use `--blocks_to_swap 22`, recommend fp8 format for T5XXL |
#   | 8GB VRAM | Use `--blocks_to_swap 28`, recommend fp8 format for T5XXL |
# "Basic settings": the guide's command (§4): networks.lora_flux dim 16 alpha 1, AdamW8bit, --sdpa, fp16, gradient
# checkpointing, flux_shift, raw, both caches (CLIP-L trains: a partial cache), at FLUX's 1024 px. The 16 GB row gives no
# number: the guide's own --blocks_to_swap 18. An fp8 T5 file changes nothing here: --fp8_base stores T5 in float8 anyway.
GUIDE = ["--network_module", "networks.lora_flux", "--network_dim", "16", "--network_alpha", "1", "--optimizer_type", "AdamW8bit",
         "--sdpa", "--mixed_precision", "fp16", "--gradient_checkpointing", "--guidance_scale", "1.0", "--timestep_sampling", "flux_shift",
         "--model_prediction_type", "raw", "--cache_text_encoder_outputs", "--cache_latents", "--fp8_base", "--resolution", "1024"]
TIERS = {24: ["--train_batch_size", "2"],
         16: ["--train_batch_size", "1", "--blocks_to_swap", "18"],
         12: ["--train_batch_size", "1", "--blocks_to_swap", "16"],
         10: ["--train_batch_size", "1", "--blocks_to_swap", "22"],
         8: ["--train_batch_size", "1", "--blocks_to_swap", "28"]}
CUDA_CONTEXT = 0.5 * GiB       # added to the plan for the comparison: the plan counts tensors only
MARGIN = 0.90                  # lora_kit's plan must stay under 90 % of each tier


def tier_argv(gb: int, model: str = "flux1-dev") -> list[str]:
    return ["--pretrained_model_name_or_path", model, *GUIDE, *TIERS[gb]]


def tier_peak(argv: list[str]) -> int:
    "The plan's peak on a GPU for `argv`, plus `CUDA_CONTEXT` (bytes)."
    from lora_kit.config import make_config
    from vram_plan import make_plan, phase_bytes
    plan = make_plan(make_config(argv, check=False))
    return max(t for t, _ in phase_bytes(plan, "device").values()) + CUDA_CONTEXT


def tier_rows(model: str = "flux1-dev") -> list[tuple]:
    """(tier GB, flags, plan peak + CUDA context in bytes, ratio to the tier, the same with --network_train_unet_only or None)
    per tier of sd-scripts' table; the CLIP-L-frozen variant is planned only where the guide's flags miss the 10 % margin."""
    rows = []
    for gb, flags in TIERS.items():
        peak = tier_peak(tier_argv(gb, model))
        frozen = tier_peak(tier_argv(gb, model) + ["--network_train_unet_only"]) if peak > MARGIN * gb * GiB else None
        rows.append((gb, flags, peak, peak / (gb * GiB), frozen))
    return rows


def tier_table(model: str = "flux1-dev") -> int:
    "Print sd-scripts' FLUX.1 tiers against lora_kit's plan of the same settings (GiB); 1 when a tier is not beaten by 10 %."
    print(f"FLUX.1 [dev] ({model}) 1024 px, sd-scripts' guide flags with --fp8_base: {' '.join(GUIDE)}")
    print("| sd-scripts tier | its settings | lora_kit plan + 0.5 CUDA context | plan / tier | with --network_train_unet_only |")
    print("|---|---|---|---|---|")
    rows = tier_rows(model)
    for gb, flags, peak, ratio, frozen in rows:
        alt = f"{frozen / GiB:.2f} ({frozen / (gb * GiB):.3f})" if frozen else "-"
        print(f"| {gb} GB | {' '.join(flags)} | {peak / GiB:.2f} | {ratio:.3f} | {alt} |", flush=True)
    bad = [gb for gb, _, _, r, _ in rows if r > MARGIN]
    print("every tier beaten by at least 10 %" if not bad else f"not beaten by 10 % with the guide's flags: {', '.join(f'{g} GB' for g in bad)}")
    return 1 if bad else 0

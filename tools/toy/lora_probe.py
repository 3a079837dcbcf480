"""Quick proof that a LoRA on the toy model learns the held-out concept ("sks" = star). Not the product code.

A minimal kohya-style LoRA (peft LoraConfig on the UNet attention projections to_q, to_k, to_v, to_out.0;
text encoder frozen) is trained on a few concept images with the SD 1.x loss, then the checker counts how
often the concept prompt yields a star, before vs after; lr=0 is the control (must stay at the base rate).

Usage: python lora_probe.py toy-sd1 --steps 300 --lr 1e-3 --dim 8 --alpha 8 [--lr 0 for the control]

Public API:
    concept_batch(pipe, n_images, seed) -> (latents, captions)
    add_unet_lora(unet, dim, alpha, targets) -> list of LoRA parameters
    train_lora(pipe, steps, lr, dim, alpha, batch, n_images, seed) -> dict(time_s, final_loss)
    CONCEPT_PROMPTS
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

import evaluate as ev
import toyworld as tw

CONCEPT_PROMPTS = ["a large red sks at the center", "a small blue sks at the top left",
                   "a large green sks at the bottom right", "a yellow sks"]
# Settings found to work on toy-sd1 (see the report); train_lora(pipe, **DEFAULTS).
DEFAULTS = dict(steps=300, lr=1e-3, dim=8, alpha=8.0, batch=4, n_images=16, seed=0)
CONTROL_PROMPTS = ["a large red circle at the center", "a small blue square at the top left",
                   "a large green triangle at the bottom right"]


@torch.no_grad()
def concept_batch(pipe, n_images: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    "VAE posterior (mean, std) of `n_images` concept images and their captions ('a small red sks at the top left')."
    imgs, caps = zip(*tw.make_samples(n_images, seed=seed, concept=True))
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs]).float()
    post = pipe.vae.encode(x / 127.5 - 1).latent_dist
    return post.mean, post.std, list(caps)


def add_unet_lora(unet, dim: int = 8, alpha: float = 8.0,
                  targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> list[torch.nn.Parameter]:
    "Inject peft LoRA adapters (scale alpha/dim, up-weights zero-initialised as in kohya) and freeze the rest."
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=dim, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True))
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def train_lora(pipe, steps: int = 300, lr: float = 1e-3, dim: int = 8, alpha: float = 8.0, batch: int = 4,
               n_images: int = 16, seed: int = 0, log=print) -> dict:
    "Train a UNet LoRA on the concept images in place (text encoder frozen); returns timing and loss."
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std, caps = concept_batch(pipe, n_images, seed)
    with torch.no_grad():
        ids = pipe.tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        cond_all = pipe.text_encoder(ids).last_hidden_state
    sf = pipe.vae.config.scaling_factor
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = add_unet_lora(pipe.unet, dim, alpha)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pipe.unet.train()
    t0, run = time.time(), None
    for step in range(steps):
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * sf
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        pred = pipe.unet(sched.add_noise(lat, noise, t), t, cond_all[idx]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run = loss.item() if run is None else 0.95 * run + 0.05 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"lora step {step} loss(avg) {run:.4f} {time.time() - t0:.0f}s")
    pipe.unet.eval()
    return {"time_s": time.time() - t0, "final_loss": run, "n_params": sum(p.numel() for p in params)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--per_prompt", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip_before", action="store_true")
    ap.add_argument("--sheet", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = ev.load_pipeline(args.model)
    res = {"args": vars(args)}
    if not args.skip_before:
        res["before"], res["before_hist"] = ev.concept_rate(pipe, CONCEPT_PROMPTS, args.per_prompt, guidance=args.guidance,
                                                            seed=args.seed + 1)
        print("before: star rate", res["before"], res["before_hist"], flush=True)
    res["train"] = train_lora(pipe, args.steps, args.lr, args.dim, args.alpha, args.batch, args.images, args.seed)
    res["after"], res["after_hist"] = ev.concept_rate(pipe, CONCEPT_PROMPTS, args.per_prompt, guidance=args.guidance,
                                                      seed=args.seed + 1)
    print("after: star rate", res["after"], res["after_hist"])
    res["control_after"], res["control_hist"] = ev.concept_rate(pipe, CONTROL_PROMPTS, args.per_prompt,
                                                                guidance=args.guidance, seed=args.seed + 2)
    print("control prompts (circle/square/triangle) after: star rate", res["control_after"], res["control_hist"])
    if args.sheet:
        imgs = ev.generate(pipe, CONCEPT_PROMPTS, 8, guidance=args.guidance, seed=args.seed + 1)
        ev.contact_sheet(imgs).save(args.sheet)
    print(json.dumps(res))


if __name__ == "__main__":
    main()

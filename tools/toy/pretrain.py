"""Pretrain the toy SD1 model from scratch on the toy world (no concept), on ONE CPU thread, reproducibly.

Stages (all seeded; defaults are the full run, ~50 min on one thread of this machine):
1. VAE: AutoencoderKL on random 32x32 crops of toy images (L1 + MSE + tiny KL); the VAE is fully
   convolutional (no mid attention), so crops train it 4x faster than full 64 px images.
2. Cache latents (mean, std of the posterior) of a pool of toy images; scaling_factor = 1 / std(latents).
3. Text encoder + UNet trained jointly with the SD 1.x objective: DDPM noise (scaled_linear betas), epsilon
   target, min-SNR-gamma=5 weighting, 10% empty captions (for classifier-free guidance), AdamW (no weight decay,
   so embedding rows of words never seen -- e.g. "sks" -- stay at their random init), EMA of the weights.
4. Save an SD 1.5-layout diffusers folder with StableDiffusionPipeline.save_pretrained (safetensors,
   safety_checker None, PNDMScheduler with SD 1.5's config).

Usage: python pretrain.py --out toy-sd1 [--vae_steps 2000 --unet_steps 3000 ...]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from PIL import Image, ImageDraw

import toymodel as tm
from lora_kit.checkpoint import atomic_path
from lora_kit.families.sd import SD_VARIANTS
from lora_kit.loss import min_snr_weight
from lora_kit.toy import world as tw


def random_blob(rng: random.Random, res: int = tw.RESOLUTION, supersample: int = 4) -> Image.Image:
    """A random star-shaped polygon (3-10 vertices at jittered even angles and radii 0.3-1 r) in a random palette colour.

    Only for training the VAE as a generic codec of flat shapes, so it can later reconstruct the held-out
    concept without ever having seen it; the diffusion model never sees these."""
    r = rng.uniform(7, 20)
    cx, cy = rng.uniform(r + 1, res - r - 1), rng.uniform(r + 1, res - r - 1)
    k = rng.randint(3, 10)
    a0 = rng.uniform(0, 2 * math.pi)
    angles = [a0 + (i + rng.uniform(-0.3, 0.3)) * 2 * math.pi / k for i in range(k)]
    s = supersample
    pts = [((cx + rng.uniform(0.3, 1) * r * math.cos(a)) * s, (cy + rng.uniform(0.3, 1) * r * math.sin(a)) * s)
           for a in angles]
    big = Image.new("RGB", (res * s,) * 2, tw.BACKGROUND)
    ImageDraw.Draw(big).polygon(pts, fill=tw.COLORS[rng.choice(list(tw.COLORS))])
    return big.resize((res, res), Image.Resampling.BOX)


def pool_scenes(n: int, seed: int, shapes: tuple[str, ...] = tw.SHAPES) -> list[tw.Scene]:
    "The `n` scenes of the training pool (deterministic in `seed`)."
    rng = random.Random(seed)
    return [tw.sample_scene(rng, shapes) for _ in range(n)]


def render_pool(n: int, seed: int, shapes: tuple[str, ...] = tw.SHAPES) -> tuple[torch.Tensor, list[tw.Scene]]:
    "`n` toy images as a float tensor (n, 3, 64, 64) in [-1, 1] plus their scenes."
    scenes = pool_scenes(n, seed, shapes)
    arr = np.stack([np.asarray(tw.render(s)) for s in scenes])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, scenes


def vae_pool(n: int, seed: int, p_blob: float = 0.5) -> torch.Tensor:
    "VAE training images: toy scenes (no concept) mixed with random polygons (`random_blob`)."
    rng = random.Random(seed)
    imgs = [random_blob(rng) if rng.random() < p_blob else tw.render(tw.sample_scene(rng)) for _ in range(n)]
    arr = np.stack([np.asarray(im) for im in imgs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    "One random `size` x `size` crop per image (offsets aligned to the VAE factor 4)."
    n, _, h, w = x.shape
    ys = torch.randint(0, (h - size) // 4 + 1, (n,), generator=gen) * 4
    xs = torch.randint(0, (w - size) // 4 + 1, (n,), generator=gen) * 4
    return torch.stack([x[i, :, y:y + size, xx:xx + size] for i, (y, xx) in enumerate(zip(ys.tolist(), xs.tolist()))])


def cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.1) -> float:
    "Linear warm-up then cosine decay to `floor` * base."
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(steps: int, batch: int = 16, crop: int = 32, lr: float = 2e-3, kl_weight: float = 1e-4,
              pool: int = 6000, seed: int = 0, log=print) -> torch.nn.Module:
    "Train the toy AutoencoderKL; returns it in eval mode."
    torch.manual_seed(seed)
    vae = tm.build_vae()
    x = vae_pool(pool, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        idx = torch.randint(0, pool, (batch,), generator=gen)
        xb = random_crops(x[idx], crop, gen)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = F.l1_loss(rec, xb) + F.mse_loss(rec, xb) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f} {time.time() - t0:.0f}s "
                f"(cpu {time.process_time():.0f}s)")
    return vae.eval()


@torch.no_grad()
def encode_pool(vae, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    "Posterior mean and std of the VAE latents for every image (unscaled)."
    means, stds = [], []
    for i in range(0, len(x), batch):
        post = vae.encode(x[i:i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


tokenize = SD_VARIANTS["sd1"].tokenize  # token ids padded to 77, as the trainer and StableDiffusionPipeline do


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weight for epsilon prediction (`lora_kit.loss.min_snr_weight`, Hang et al. 2023).

    SNR is ac / (1 - ac) here: `loss.snr_table` computes (sqrt(ac) / sqrt(1 - ac))**2 as sd-scripts does, which
    differs in the last bits (up to 2e-4), and the shipped model was trained with this form."""
    ac = alphas_cumprod[t]
    return min_snr_weight(ac / (1 - ac), gamma)


class EMA:
    "Exponential moving average of parameters (decay ramps up as (1+n)/(10+n) early on)."

    def __init__(self, params: list[torch.Tensor], decay: float = 0.999):
        self.params, self.decay, self.n = list(params), decay, 0
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        "Exchange live and averaged weights (call twice to restore); used to save EMA checkpoints mid-run."
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def train_diffusion(unet, text_encoder, tokenizer, lat_mean: torch.Tensor, lat_std: torch.Tensor,
                    scenes: list[tw.Scene], scaling_factor: float, steps: int, batch: int = 32, lr: float = 1e-3,
                    p_uncond: float = 0.1, p_drop: float = 0.25, ema_decay: float = 0.999, seed: int = 0,
                    log=print, checkpoint=None, every: int = 0, state_path: Path | None = None,
                    state_every: int = 200) -> float:
    """Jointly train UNet + text encoder on cached latents (in place); EMA weights are copied in at the end.

    With `state_path`, the full state (weights, EMA, optimizer, RNG states) is written there every `state_every`
    steps and training resumes from it if it exists -- bit-for-bit the same result as an uninterrupted run.
    Returns the CPU seconds spent in this stage (summed over resumed sessions)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sched = DDPMScheduler.from_config(tm.scheduler_config())  # same betas as the saved PNDM scheduler
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = EMA(params, ema_decay)
    unet.train(), text_encoder.train()
    t0, run, start, cpu0, cpu_before = time.time(), 0.0, 0, time.process_time(), 0.0
    if state_path is not None and Path(state_path).exists():
        st = torch.load(state_path, weights_only=False)
        unet.load_state_dict(st["unet"]), text_encoder.load_state_dict(st["text_encoder"])
        opt.load_state_dict(st["opt"])
        ema.shadow, ema.n = st["ema"], st["ema_n"]
        gen.set_state(st["gen"]), rng.setstate(st["rng"])
        start, run, cpu_before = st["step"], st["run"], st["cpu_s"]
        log(f"resumed from {state_path} at step {start}")
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        idx = torch.randint(0, len(scenes), (batch,), generator=gen)
        lat = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling_factor
        caps = ["" if rng.random() < p_uncond else tw.random_caption(scenes[i], rng, p_drop) for i in idx.tolist()]
        cond = text_encoder(tokenize(tokenizer, caps)).last_hidden_state
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(sched.add_noise(lat, noise, t), t, cond).sample
        per = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))
        loss = (per * min_snr_weights(sched.alphas_cumprod, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        run = 0.98 * run + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step} loss(avg) {run:.4f} lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s "
                f"(cpu {time.process_time():.0f}s)")
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            ema.swap()
            checkpoint(step + 1)
            ema.swap()
        if state_path is not None and (step + 1) % state_every == 0 and step + 1 < steps:
            st = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
                  "ema": ema.shadow, "ema_n": ema.n, "gen": gen.get_state(), "rng": rng.getstate(),
                  "step": step + 1, "run": run, "cpu_s": cpu_before + time.process_time() - cpu0}
            with atomic_path(state_path) as tmp:  # a kill never leaves half a file
                torch.save(st, tmp)
    ema.copy_to()
    unet.eval(), text_encoder.eval()
    return cpu_before + time.process_time() - cpu0


def build_pipeline(vae, text_encoder, tokenizer, unet):
    "StableDiffusionPipeline from the parts, with SD 1.5's PNDM scheduler and no safety checker."
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(tm.scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_pipeline(pipe, out: Path) -> None:
    """`save_pretrained` (safetensors), then store the tokenizer as the classic vocab.json + merges.txt pair.

    transformers 5 writes only tokenizer.json (3.6 MB); SD 1.5 folders ship vocab.json + merges.txt (1.5 MB), which
    CLIPTokenizer.from_pretrained reads just as well -- this keeps the folder under 25 MB."""
    import shutil

    pipe.save_pretrained(out, safe_serialization=True)
    tok = Path(out) / "tokenizer"
    shutil.rmtree(tok)
    shutil.copytree(tm.TOKENIZER_DIR, tok)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="toy-sd1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae_steps", type=int, default=3000)
    ap.add_argument("--vae_batch", type=int, default=8)
    ap.add_argument("--vae_lr", type=float, default=1e-3)
    ap.add_argument("--vae_kl", type=float, default=1e-5)
    ap.add_argument("--vae_from", default=None, help="reuse the vae/ of an existing folder (experiments)")
    ap.add_argument("--pool", type=int, default=12000, help="toy images whose latents are cached for the UNet")
    ap.add_argument("--latent_std", type=float, default=1.0,
                    help="std of the scaled latents: scaling_factor = latent_std / std(VAE latents)")
    ap.add_argument("--unet_steps", type=int, default=3600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init_from", default=None, help="start UNet/text encoder from a folder (experiments)")
    ap.add_argument("--save_every", type=int, default=0, help="also save EMA checkpoints <out>-step<N>")
    ap.add_argument("--resume", action="store_true", help="continue a killed run (same args) from its state files")
    ap.add_argument("--fp16", action="store_true", help="store weights in fp16 (halves the size)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out.parent / f"{out.name}.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"args {vars(args)}")
    # Each stage records its CPU seconds in <out>.stages.json, so a killed run restarted with --resume skips
    # finished stages and the report still sums the CPU time of all sessions (the machine is shared: wall time
    # depends on the other workers, CPU time of our single thread does not).
    stages_file = out.parent / f"{out.name}.stages.json"
    stages = json.loads(stages_file.read_text()) if args.resume and stages_file.exists() else {}

    def done(stage: str, cpu0: float, wall0: float) -> None:
        stages[stage] = {"cpu_s": time.process_time() - cpu0, "wall_s": time.time() - wall0}
        stages_file.write_text(json.dumps(stages, indent=1))

    from diffusers import AutoencoderKL

    c0, w0 = time.process_time(), time.time()
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").eval()
    elif "vae" in stages:
        vae = AutoencoderKL.from_pretrained(out / "vae").eval()
        log("resume: VAE loaded")
    else:
        vae = train_vae(args.vae_steps, args.vae_batch, lr=args.vae_lr, kl_weight=args.vae_kl, seed=args.seed, log=log)
        vae.save_pretrained(out / "vae")  # saved again (with scaling_factor) with the pipeline
        done("vae", c0, w0)

    c0, w0 = time.process_time(), time.time()
    cache_file = out.parent / f"{out.name}.latents.pt"
    if "cache" in stages:
        lat_mean, lat_std, scaling_factor = torch.load(cache_file).values()
        scenes = pool_scenes(args.pool, args.seed + 10)
        log("resume: latents loaded")
    else:
        x, scenes = render_pool(args.pool, args.seed + 10)
        lat_mean, lat_std = encode_pool(vae, x)
        del x
        sample = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=torch.Generator().manual_seed(args.seed))
        scaling_factor = round(args.latent_std / sample.std().item(), 5)
        log(f"latents {tuple(lat_mean.shape)} mean {sample.mean():.3f} std {sample.std():.3f} -> scaling_factor "
            f"{scaling_factor}; posterior std mean {lat_std.mean():.4f}")
        torch.save({"mean": lat_mean, "std": lat_std, "scaling_factor": scaling_factor}, cache_file)
        done("cache", c0, w0)
    vae.register_to_config(scaling_factor=scaling_factor)

    w0 = time.time()
    torch.manual_seed(args.seed + 20)
    tokenizer = tm.load_tokenizer()
    text_encoder, unet = tm.build_text_encoder(), tm.build_unet()
    if args.init_from:  # experiments: continue from a saved folder's weights (fresh optimizer)
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(args.init_from, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder")

    def checkpoint(step: int) -> None:
        save_pipeline(build_pipeline(vae, text_encoder, tokenizer, unet), out.parent / f"{out.name}-step{step}")
        log(f"checkpoint {out.name}-step{step}")

    state_path = out.parent / f"{out.name}.state.pt"
    if not args.resume and state_path.exists():
        state_path.unlink()
    cpu = train_diffusion(unet, text_encoder, tokenizer, lat_mean, lat_std, scenes, scaling_factor, args.unet_steps,
                          batch=args.batch, lr=args.lr, seed=args.seed + 30, log=log, checkpoint=checkpoint,
                          every=args.save_every, state_path=state_path)
    stages["unet"] = {"cpu_s": cpu, "wall_s_last_session": time.time() - w0}

    c0, w0 = time.process_time(), time.time()
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    if args.fp16:
        pipe.to(torch.float16)
    save_pipeline(pipe, out)
    done("save", c0, w0)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    total_cpu = sum(v["cpu_s"] for v in stages.values())
    log(f"saved {out} ({size / 1e6:.1f} MB); CPU seconds per stage "
        f"{ {k: round(v['cpu_s']) for k, v in stages.items()} }, total {total_cpu:.0f} s = {total_cpu / 60:.1f} min")
    (out.parent / f"{out.name}.train.json").write_text(json.dumps({"args": vars(args), "stages": stages,
                                                                  "cpu_total_s": total_cpu, "bytes": size}, indent=1))
    state_path.unlink(missing_ok=True)
    cache_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

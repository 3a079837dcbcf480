"""Peak memory of lora_kit's training with and without each memory lever.

    python bench/memory_levers.py --model mid
    python bench/memory_levers.py --model sd15 --bench_dir /work/scratch/bench   # full-size, after vs_sd_scripts.py

UNet-only LoRA (network_dim 8), AdamW, batch 2, fp32, on the CPU; each variant runs in its own subprocess.
Levers:
- `--gradient_checkpointing`: run through `lora_kit.train.train` with and without the flag;
- `--cache_latents` and `--cache_text_encoder_outputs`: not implemented in lora_kit yet (the flags are refused), so
  their effect is measured on the same training written out by hand: latents (text-encoder outputs) are computed
  once before training and the VAE (text encoder) is then deleted, as sd-scripts does when caching. The hand-written
  baseline (no lever) is measured too, so the saving is a difference within one method.
Memory is the peak RSS during the training steps (VmHWM reset after the model is built); "model" is the RSS when
training starts. Not a test: numbers depend on the machine."""
from __future__ import annotations
import argparse, gc, os, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESOLUTION, bench_components, load_now, peak_rss_mb, reset_peak_rss, rss_mb, run_worker,
                    worker_result, write_dataset)

BATCH, RANK, LR = 2, 8, 1e-4
RES = {**RESOLUTION, "sd15": 256}


def components(a):
    "The benchmark model: `tiny`/`mid` built in memory, `sd15` the random SD1.5-shaped folder vs_sd_scripts.py wrote."
    if a.model != "sd15": return bench_components(a.model)
    from lora_kit.models import load_diffusers_folder
    return load_diffusers_folder(Path(a.bench_dir)/"sd15_random_diffusers")


def lora_kit_worker(a) -> dict:
    "`lora_kit.train.train` with or without --gradient_checkpointing; peak RSS over the training steps."
    import torch
    torch.set_num_threads(a.threads)
    from lora_kit.config import make_config
    from lora_kit.train import Callback, train

    class Peak(Callback):
        def on_train_start(self, state):
            gc.collect(); self.start = rss_mb(os.getpid()); reset_peak_rss()
        def on_step_end(self, state):
            if state.step == a.steps: self.peak = peak_rss_mb()

    comp, peak = components(a), Peak()
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", a.data, "--caption_extension", ".txt",
            "--resolution", str(RES[a.model]), "--train_batch_size", str(BATCH), "--network_module", "networks.lora",
            "--network_dim", str(RANK), "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", str(LR),
            "--max_train_steps", str(a.steps), "--seed", "0", "--max_data_loader_n_workers", "0", "--mixed_precision", "no",
            "--output_dir", tempfile.mkdtemp(prefix="lk_mem_"), "--output_name", "m"]
    if a.lever == "gradient_checkpointing": argv.append("--gradient_checkpointing")
    train(make_config(argv), callbacks=[peak], comp=comp)
    return {"model_rss": peak.start, "peak_rss": peak.peak}


def manual_worker(a) -> dict:
    "The same training by hand, optionally with latents / text-encoder outputs cached and their model deleted."
    import random
    import numpy as np, torch
    import torch.nn.functional as F
    from PIL import Image
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor
    from lora_kit.lora import LoRANetwork
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    comp = components(a)
    unet, vae, te, tok = comp.denoiser, comp.vae, comp.text_encoders[0], comp.tokenizers[0]
    for m in (unet, vae, te): m.requires_grad_(False).eval()
    unet.set_attn_processor(AttnProcessor())
    if a.lever == "gradient_checkpointing": unet.enable_gradient_checkpointing()
    net = LoRANetwork(comp.family.lora_targets(comp, train_text_encoder=False), dim=RANK, alpha=1).apply_to()
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    images = sorted(Path(a.data).rglob("*.png"))

    def pixels(paths):
        arrs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in paths]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def encode_images(paths): return vae.encode(pixels(paths)).latent_dist.sample() * vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(paths):
        ids = tok([p.with_suffix(".txt").read_text().strip() for p in paths], padding="max_length", max_length=77,
                  truncation=True, return_tensors="pt").input_ids
        return te(ids)[0]

    latents = {p: encode_images([p])[0] for p in images} if a.lever == "cache_latents" else None
    conds = {p: encode_text([p])[0] for p in images} if a.lever == "cache_text_encoder_outputs" else None
    if latents: del vae, comp.vae
    if conds: del te, comp.text_encoders[0]
    gc.collect()
    start = rss_mb(os.getpid()); reset_peak_rss()
    for step in range(a.steps):
        paths = random.sample(images, BATCH)
        lat = torch.stack([latents[p] for p in paths]) if latents else encode_images(paths)
        cond = torch.stack([conds[p] for p in paths]) if conds else encode_text(paths)
        noise, t = torch.randn_like(lat), torch.randint(0, 1000, (BATCH,))
        loss = F.mse_loss(unet(sched.add_noise(lat, noise, t), t, cond).sample, noise)
        loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    return {"model_rss": start, "peak_rss": peak_rss_mb()}


WORKERS = {"lora_kit": lora_kit_worker, "manual": manual_worker}
VARIANTS = [("lora_kit", "none"), ("lora_kit", "gradient_checkpointing"), ("manual", "none"),
            ("manual", "gradient_checkpointing"), ("manual", "cache_latents"), ("manual", "cache_text_encoder_outputs")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mid", choices=["tiny", "mid", "sd15"])
    p.add_argument("--steps", type=int, default=2, help="training steps per run (the optimizer state exists from step 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bench_dir", default=os.environ.get("BENCH_DIR", str(Path.home()/".cache/lora_kit_bench")),
                   help="with --model sd15: the folder holding sd15_random_diffusers/ (written by vs_sd_scripts.py)")
    p.add_argument("--workdir", default=None, help="where the toy dataset is written (default: a temp dir)")
    p.add_argument("--worker", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--lever", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker: return worker_result(WORKERS[a.worker](a))
    data = write_dataset(Path(a.workdir or tempfile.mkdtemp(prefix="lk_bench_"))/f"data_{RES[a.model]}", n=8, res=RES[a.model])
    print(f"model {a.model} at {RES[a.model]} px, batch {BATCH}, UNet-only LoRA dim {RANK}, {a.steps} steps; load {load_now()}")
    base = {}
    for who, lever in VARIANTS:
        o = run_worker(Path(__file__), [who, "--lever", lever, "--model", a.model, "--data", str(data), "--steps", str(a.steps),
                                        "--threads", str(a.threads), "--bench_dir", a.bench_dir], a.threads)
        base.setdefault(who, o["peak_rss"])
        delta = "" if lever == "none" else f" ({o['peak_rss'] - base[who]:+.0f} MiB, {o['peak_rss'] / base[who]:.2f}×)"
        print(f"{who:8s} {lever:28s}: peak RSS while training {o['peak_rss']:7.0f} MiB{delta}; RSS at start {o['model_rss']:.0f} MiB",
              flush=True)
    print("pending in lora_kit: --cache_latents, --cache_text_encoder_outputs (measured on the hand-written loop above)")
    print(f"load after: {load_now()}")


if __name__ == "__main__":
    main()

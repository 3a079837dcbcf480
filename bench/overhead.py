"""lora_kit's training step against a minimal hand-written diffusers + peft LoRA loop on the same model and data.

    python bench/overhead.py --model tiny mid --rounds 2
    python bench/overhead.py --model sdxl-mid --rounds 2            # SDXL: sdxl_train_network against diffusers + peft
    python bench/overhead.py --model tiny --rounds 4 --threads 0 --memos   # as each is run: defaults, lora_kit's memos

Both train a rank-8 LoRA on the UNet's attention blocks and the text encoder's attention/MLP layers (the layers
sd-scripts' `networks.lora` targets), AdamW, batch 2, max_grad_norm 1.0, fp32, on the same seeded random model and
the same toy-world images. Each variant runs in its own subprocess (clean peak RSS), variants alternate (A B A B …)
so machine load hits both alike; after `--warmup` steps, `--steps` steps are timed (wall clock and this process's CPU
time, which load inflates much less). The SDXL models (`sdxl-tiny`, `sdxl-mid`) train LoRA on the UNet and both
text encoders; the bare loop conditions the UNet as SDXL does (CLIP-L ⧺ bigG penultimate states, bigG pooled
vector, original size / crop / target size ids). Each pair of runs gives a lora_kit / bare ratio of the median step times; printed
are the median of those ratios and their spread (min–max), and the peak RSS ratio (target ≤ 1.05×). Not a test: numbers
depend on the machine."""
from __future__ import annotations
import argparse, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESOLUTION, bench_components, is_sdxl, load_now, median, peak_rss_mb, run_worker, worker_result,
                    write_dataset)

BATCH, RANK, ALPHA, LR = 2, 8, 8, 1e-4
# peft target regexes for the layers kohya's networks.lora wraps: every Linear/1×1 Conv inside the UNet's
# Transformer2DModel blocks, and the CLIP text encoder's attention and MLP projections.
UNET_LORA_RE = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
TE_LORA_RE = r".*\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"


def lora_kit_worker(a) -> dict:
    "Train with `lora_kit.train.train` on the benchmark model; time each optimizer step from a callback."
    import torch
    if a.threads: torch.set_num_threads(a.threads)      # else lora_kit's own thread policy (train's cpu_threads)
    from lora_kit.config import make_config
    from lora_kit.train import Callback, train

    class Timer(Callback):
        def __init__(self): self.times, self.cpu, self.peak = [], [], 0.0
        def on_train_start(self, state): self.times.append(time.perf_counter()); self.cpu.append(time.process_time())
        def on_step_end(self, state):
            self.times.append(time.perf_counter()); self.cpu.append(time.process_time())
            if state.step == a.warmup + a.steps: self.peak = peak_rss_mb()

    if not a.memos:      # the same work as the bare loop: the VAE encodes every image at every step
        import lora_kit.train
        from lora_kit.runtime.memos import Memos
        lora_kit.train.frozen_memos = lambda *args: Memos()
    comp = bench_components(a.model)
    out = tempfile.mkdtemp(prefix="lk_overhead_")
    argv = ["--pretrained_model_name_or_path", "tiny-sdxl" if is_sdxl(a.model) else "tiny-sd1", "--train_data_dir", a.data, "--caption_extension", ".txt",
            "--resolution", str(RESOLUTION[a.model]), "--train_batch_size", str(BATCH), "--network_module", "networks.lora",
            "--network_dim", str(RANK), "--network_alpha", str(ALPHA), "--optimizer_type", "AdamW", "--learning_rate", str(LR),
            "--max_train_steps", str(a.warmup + a.steps), "--seed", "0", "--max_data_loader_n_workers", "0",
            "--mixed_precision", "no", "--output_dir", out, "--output_name", "bench"] + (["--attention", "vanilla"] if a.vanilla else [])
    timer = Timer()
    state = train(make_config(argv), callbacks=[timer], comp=comp)
    return {"step_times": _deltas(timer.times)[a.warmup:], "cpu_times": _deltas(timer.cpu)[a.warmup:], "peak_rss": timer.peak,
            "peak_rss_end": peak_rss_mb(), "threads": torch.get_num_threads(),
            "lora_layers": len(state.network.loras),
            "lora_params": sum(p.numel() for p in state.network.parameters() if p.requires_grad)}


def bare_worker(a) -> dict:
    "The same training as a minimal loop: diffusers models, peft LoRA layers, torch AdamW."
    import random
    import numpy as np, torch
    import torch.nn.functional as F
    from PIL import Image
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor
    from peft import LoraConfig, inject_adapter_in_model
    if a.threads: torch.set_num_threads(a.threads)      # else torch's default: one per core
    torch.manual_seed(0)

    comp = bench_components(a.model)
    unet, vae, tes, toks = comp.denoiser, comp.vae, comp.text_encoders, comp.tokenizers
    for m in (unet, vae, *tes): m.requires_grad_(False).eval()
    if a.vanilla: unet.set_attn_processor(AttnProcessor())     # sd-scripts' default attention (lora_kit --attention vanilla)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_LORA_RE), unet)
    for te in tes: inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TE_LORA_RE), te)
    params = [p for m in (unet, *tes) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    images = sorted(Path(a.data).rglob("*.png"))
    captions = {p: p.with_suffix(".txt").read_text().strip() for p in images}

    def batches():
        while True:
            order = images * 10
            random.shuffle(order)
            yield from (order[i:i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH))

    def pixels(paths):
        arrs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in paths]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()

    times, cpu, it = [time.perf_counter()], [time.process_time()], batches()
    for step in range(a.warmup + a.steps):
        paths = next(it)
        with torch.no_grad(): latents = vae.encode(pixels(paths)).latent_dist.sample() * vae.config.scaling_factor
        ids = [tok([captions[p] for p in paths], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
               for tok in toks]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        noisy = sched.add_noise(latents, noise, t)
        if len(tes) == 1: pred = unet(noisy, t, tes[0](ids[0])[0]).sample
        else:        # SDXL: penultimate states of both encoders, bigG's projected pooled vector, size / crop ids
            out1, out2 = (te(i, output_hidden_states=True) for te, i in zip(tes, ids))
            cond = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
            h, w = noisy.shape[-2] * 8, noisy.shape[-1] * 8
            time_ids = torch.tensor([[h, w, 0, 0, h, w]] * noisy.shape[0])
            pred = unet(noisy, t, cond, added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter()); cpu.append(time.process_time())
    n_layers = sum(1 for m in (unet, *tes) for n, _ in m.named_modules() if n.endswith(".lora_A"))
    return {"step_times": _deltas(times)[a.warmup:], "cpu_times": _deltas(cpu)[a.warmup:], "peak_rss": peak_rss_mb(),
            "peak_rss_end": peak_rss_mb(), "threads": torch.get_num_threads(),
            "lora_layers": n_layers, "lora_params": sum(p.numel() for p in params)}


def _deltas(stamps: list[float]) -> list[float]: return [b - a for a, b in zip(stamps, stamps[1:])]


WORKERS = {"lora_kit": lora_kit_worker, "bare": bare_worker}


def ratio_line(label: str, ratios: list[float], target: str) -> str:
    "The median of per-pair ratios with their spread."
    rs = sorted(ratios)
    return f"{label} ratio lora_kit / bare: median {median(rs):.3f}× (spread {rs[0]:.3f}–{rs[-1]:.3f} over {len(rs)} pairs; {target})"


def compare(a, model: str, data: Path) -> None:
    "Alternate the two variants for `a.rounds` rounds on `model`; print times, RSS and ratios."
    steps, warmup = a.steps or (30 if model.endswith("tiny") else 8), a.warmup or (5 if model.endswith("tiny") else 2)
    res = {k: [] for k in WORKERS}
    for r in range(a.rounds):
        order = list(WORKERS) if r % 2 == 0 else list(WORKERS)[::-1]
        for name in order:
            before = load_now()
            out = run_worker(Path(__file__), [name, "--model", model, "--data", str(data), "--steps", str(steps),
                                              "--warmup", str(warmup), "--threads", str(a.threads)] + (["--vanilla"] if a.vanilla else [])
                             + (["--memos"] if a.memos else []), a.threads)
            out["load"] = f"{before} -> {load_now()}"
            res[name].append(out)
            print(f"  {model} round {r + 1} {name:8s}: median step {median(out['step_times']) * 1000:8.1f} ms (CPU "
                  f"{median(out['cpu_times']) * 1000:.1f} ms, {out['threads']} thread(s)), peak RSS {out['peak_rss']:7.0f} MiB "
                  f"(at exit {out['peak_rss_end']:.0f}), load {out['load']}", flush=True)
    lk, bare = res["lora_kit"], res["bare"]
    if (lk[0]["lora_layers"], lk[0]["lora_params"]) != (bare[0]["lora_layers"], bare[0]["lora_params"]):
        print(f"  WARNING: different LoRA layers: lora_kit {lk[0]['lora_layers']} layers/{lk[0]['lora_params']} params, "
              f"bare {bare[0]['lora_layers']}/{bare[0]['lora_params']}")
    pair = lambda key: [median(x[key]) / median(y[key]) for x, y in zip(lk, bare)]
    print(f"{model}: {lk[0]['lora_layers']} LoRA layers, {lk[0]['lora_params']:,} trainable params, {steps} timed steps × {a.rounds} rounds; "
          f"median step lora_kit {median([t for o in lk for t in o['step_times']]) * 1000:.1f} ms, "
          f"bare {median([t for o in bare for t in o['step_times']]) * 1000:.1f} ms")
    print(f"{model}: " + ratio_line("step time", pair("step_times"), "target ≤ 1.05"))
    print(f"{model}: " + ratio_line("CPU time per step", pair("cpu_times"), "less sensitive to load"))
    print(f"{model}: " + ratio_line("peak RSS", [x["peak_rss"] / y["peak_rss"] for x, y in zip(lk, bare)], "target ≤ 1.05"), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid", "sdxl-tiny", "sdxl-mid"])
    p.add_argument("--rounds", type=int, default=4, help="pairs of runs: A B, then B A, …")
    p.add_argument("--steps", type=int, default=0, help="timed steps per run (default 30 tiny, 8 mid)")
    p.add_argument("--warmup", type=int, default=0, help="untimed first steps (default 5 tiny, 2 mid)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each run (0: each side's default: lora_kit's "
                   "free-core policy, torch's one thread per core)")
    p.add_argument("--vanilla", action="store_true", help="sd-scripts' vanilla attention in both (default: sdpa, both sides' default)")
    p.add_argument("--memos", action="store_true", help="let lora_kit keep the frozen VAE's outputs per image (its default; "
                   "off here so that both sides do the same work)")
    p.add_argument("--workdir", default=None, help="where the toy dataset is written (default: a temp dir)")
    p.add_argument("--worker", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.model = a.model[0]
        return worker_result(WORKERS[a.worker](a))
    root = Path(a.workdir or tempfile.mkdtemp(prefix="lk_bench_"))
    print(f"load before: {load_now()}; threads per run: {a.threads}; attention: {'vanilla' if a.vanilla else 'sdpa'}")
    for model in a.model:
        compare(a, model, write_dataset(root/f"data_{model}", n=8, res=RESOLUTION[model]))
    print(f"load after: {load_now()}")


if __name__ == "__main__":
    main()

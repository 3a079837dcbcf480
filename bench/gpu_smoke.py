"""The GPU paths in one command (about 8 minutes on one H100), for the day a GPU machine is lent; one JSON line per run.

    PYTHONPATH=. python bench/gpu_smoke.py [--tiny] [--out gpu_smoke.jsonl] [--only matrix,speed,swap,photos]

- `matrix`: tiny-sd1 trains with bf16, fp16, --full_fp16, --fp8_base, AdamW8bit and PagedAdamW8bit (each saved and
  resumed), --torch_compile; tiny SD3.5 Medium with --blocks_to_swap (its swapped block back in host memory after);
  tiny FLUX.1 with fp8, --blocks_to_swap and --cpu_offload_checkpointing; tiny Chroma (its masked attention).
- `speed`: full-size SD1.5 (random weights) at 512 px, batch 1 and 4, lora_kit's step against a bare diffusers + peft
  loop doing the same work (target: steps/s ratio ≥ 0.95 at batch 4), and lora_kit's peak device memory against
  `vram_plan.py`'s plan for the same flags (target: within ±10 %).
- `swap`: `BlockSwap` on an SD3.5-Large-shaped MMDiT (random bf16 weights): one block's copy bandwidth, the step time
  with 8 blocks swapped, with and without prefetching, against none swapped, and the device memory after `remove()`;
  the step time and peak with the checkpointed inputs of the swapped blocks (or of all blocks) in host memory.
- `photos`: the data path on photo-sized JPEGs (4032×3024, bucketed to 1024 px): images/s of the loader.

`--tiny` dry-runs everything on small shapes (on a CPU: a few minutes), so the script is known to work before a GPU
is lent. Each line: {"run", "ok", "seconds", "device", ...measurements, "error" when it failed}. A failed run does
not stop the others. bench/README.md says how to carry the packages the GPU image lacks (diffusers, bitsandbytes).
"""
from __future__ import annotations
import argparse, json, os, sys, tempfile, time, traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GiB = 2**30


def sync():
    if CUDA: torch.cuda.synchronize()


def reset_peak():
    if CUDA: torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float|None: return torch.cuda.max_memory_allocated() / GiB if CUDA else None


def allocated_gib() -> float|None: return torch.cuda.memory_allocated() / GiB if CUDA else None


class Results:
    "Runs a measurement, writes its JSON line (stdout and `path`)."
    def __init__(self, path: Path):
        self.path, self.failed = path, 0
        self.device = torch.cuda.get_device_name() if CUDA else "cpu"

    def run(self, name: str, fn, *args, **kwargs):
        t0, rec = time.perf_counter(), {"run": name}
        try: rec.update(fn(*args, **kwargs) or {}); rec["ok"] = rec.get("ok", True)
        except Exception as e:
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500], where=traceback.format_exc(limit=-3)[-1500:])
        rec.update(seconds=round(time.perf_counter() - t0, 2), device=self.device)
        self.failed += not rec["ok"]
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        with open(self.path, "a") as f: f.write(line + "\n")
        return rec


class StepTimer:
    "A training callback: the wall time of each optimizer step (device synchronised)."
    uses_models = False
    def __init__(self): self.stamps = []
    def on_train_start(self, state): sync(); self.stamps.append(time.perf_counter())
    def on_step_end(self, state): sync(); self.stamps.append(time.perf_counter())
    def on_epoch_end(self, state): pass
    def on_save(self, state, path): pass
    def on_train_end(self, state): pass
    def rate(self, skip: int) -> float:
        d = [b - a for a, b in zip(self.stamps, self.stamps[1:])][skip:]
        return len(d) / sum(d) if d else float("nan")


def _train(argv: list[str], callbacks=(), comp=None):
    from lora_kit.config import make_config
    from lora_kit.train import train
    return train(make_config(argv), list(callbacks), comp=comp, progress=False)


# --- matrix: the options, each trained a few steps on the tiny models

def matrix(res: Results, tmp: Path, tiny: bool):
    from lora_kit.toy.world import write_folder
    data = tmp / "data"
    write_folder(data / "1_sks", n=4, seed=0, res=64)
    def argv(name, model="tiny-sd1", steps=4, *extra):
        module = "networks.lora_sd3" if "sd3" in model else "networks.lora_flux" if "flux" in model or "chroma" in model else "networks.lora"
        return ["--pretrained_model_name_or_path", model, "--network_module", module, "--train_data_dir", str(data),
                "--caption_extension", ".txt", "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps),
                "--seed", "0", "--sdpa", "--max_data_loader_n_workers", "0", "--output_dir", str(tmp / name), "--output_name", "m",
                "--learning_rate", "1e-3", *extra]
    def plain(name, *extra, model="tiny-sd1"):
        timer = StepTimer(); reset_peak()
        state = _train(argv(name, model, 4, *extra), [timer])
        return {"loss": state.loss, "ok": bool(torch.isfinite(torch.tensor(state.loss))), "steps_per_s": timer.rate(1), "peak_gib": peak_gib()}
    def resumed(name, optimizer):
        if "paged" in optimizer.lower() and not CUDA: return {"ok": True, "skipped": "paged optimizers need CUDA"}
        first = _train(argv(name, "tiny-sd1", 2, "--mixed_precision", "bf16", "--optimizer_type", optimizer, "--save_state"))
        state = _train(argv(name, "tiny-sd1", 4, "--mixed_precision", "bf16", "--optimizer_type", optimizer,
                            "--resume", str(tmp / name / "m-state")))
        return {"ok": state.step == 4 and bool(torch.isfinite(torch.tensor(state.loss))), "steps": [first.step, state.step], "loss": state.loss}
    def swapped():
        reset_peak()
        state = _train(argv("swap", "tiny-sd35m", 4, "--mixed_precision", "bf16", "--blocks_to_swap", "1", "--cache_latents",
                            "--cache_text_encoder_outputs", "--network_train_unet_only"))
        last = state.comp.denoiser.transformer_blocks[-1]
        where = {p.device.type for p in last.parameters()}
        return {"ok": where == {"cpu"} and bool(torch.isfinite(torch.tensor(state.loss))), "swapped_block_after": sorted(where),
                "loss": state.loss, "peak_gib": peak_gib(), "allocated_after_gib": allocated_gib()}
    for name, extra in [("bf16", ["--mixed_precision", "bf16"]), ("fp16", ["--mixed_precision", "fp16"]),
                        ("full_fp16", ["--mixed_precision", "fp16", "--full_fp16", "--optimizer_type", "AdamW8bit"]),
                        ("fp8_base", ["--mixed_precision", "bf16", "--fp8_base"])]:
        res.run(f"matrix/{name}", plain, name, *extra)
    for opt in ("AdamW8bit", "PagedAdamW8bit"): res.run(f"matrix/{opt}_save_resume", resumed, opt.lower(), opt)
    res.run("matrix/sd35m_block_swap", swapped)
    flux = ["--mixed_precision", "bf16", "--fp8_base", "--gradient_checkpointing", "--model_prediction_type", "raw", "--cache_latents",
            "--cache_text_encoder_outputs", "--network_train_unet_only"]
    res.run("matrix/flux_swap_offload", plain, "flux", *flux, "--blocks_to_swap", "2", "--cpu_offload_checkpointing", model="tiny-flux")
    res.run("matrix/chroma_swap", plain, "chroma", *flux, "--blocks_to_swap", "2", "--model_type", "chroma", "--apply_t5_attn_mask",
            "--guidance_scale", "0.0", model="tiny-chroma")     # the key-only text mask on CUDA's attention kernels
    backend = "inductor" if CUDA or not tiny else "aot_eager"      # (inductor on a CPU compiles for minutes)
    res.run(f"matrix/torch_compile_{backend}", plain, "compile", "--mixed_precision", "bf16", "--torch_compile", "--dynamo_backend", backend)


# --- speed: lora_kit's step against a bare diffusers + peft loop, and its peak against the plan

UNET_LORA_RE = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
RANK, LR = 16, 1e-4


def sd15_components(tiny: bool):
    "Full-size SD1.5 with random weights (tiny: lora_kit's tiny-sd1)."
    from lora_kit.families.sd import CONFIGS, tiny_components
    from vram_plan import sd_from_configs
    if tiny: return tiny_components("tiny-sd1")
    torch.manual_seed(0)
    return sd_from_configs("sd1", CONFIGS / "sd1")


def speed_flags(res_px: int, batch: int) -> list[str]:
    return ["--network_module", "networks.lora", "--network_dim", str(RANK), "--network_alpha", str(RANK), "--network_train_unet_only",
            "--optimizer_type", "AdamW", "--learning_rate", str(LR), "--resolution", str(res_px), "--train_batch_size", str(batch),
            "--mixed_precision", "bf16", "--sdpa", "--cache_latents", "--cache_text_encoder_outputs"]


def lora_kit_speed(tmp: Path, tiny: bool, batch: int, steps: int, warmup: int) -> dict:
    from lora_kit.toy.world import write_folder
    px = 64 if tiny else 512
    data = tmp / f"speed{px}"
    if not data.exists(): write_folder(data / "1_sks", n=8, seed=0, res=px)
    timer = StepTimer(); reset_peak()
    _train(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--max_train_steps", str(warmup + steps), "--seed", "0", "--max_data_loader_n_workers", "0",
            "--output_dir", str(tmp / f"speed_out{batch}"), *speed_flags(px, batch)], [timer], comp=sd15_components(tiny))
    return {"steps_per_s": timer.rate(warmup), "peak_gib": peak_gib()}


def bare_speed(tiny: bool, batch: int, steps: int, warmup: int) -> dict:
    "The same step without lora_kit: the UNet in bf16, peft LoRA layers (float32), bf16 autocast, AdamW; cached inputs."
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0
    from peft import LoraConfig, inject_adapter_in_model
    comp = sd15_components(tiny)
    unet = comp.denoiser.requires_grad_(False).to(DEVICE, torch.bfloat16)
    unet.set_attn_processor(AttnProcessor2_0())
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=UNET_LORA_RE), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params: p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=LR)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    side = 8 if tiny else 64
    latents = torch.randn(batch, 4, side, side, device=DEVICE)
    cond = torch.randn(batch, 77, unet.config.cross_attention_dim, device=DEVICE)
    reset_peak(); stamps = []
    for step in range(warmup + steps):
        sync(); stamps.append(time.perf_counter())
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            pred = unet(sched.add_noise(latents, noise, t), t, cond).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        loss.item()
    sync(); stamps.append(time.perf_counter())
    d = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return {"steps_per_s": len(d) / sum(d), "peak_gib": peak_gib()}


def planned_peak_gib(tiny: bool, batch: int) -> float:
    from lora_kit.config import make_config
    import vram_plan
    plan = vram_plan.make_plan(make_config(["--pretrained_model_name_or_path", "tiny-sd1" if tiny else "sd15",
                                            *speed_flags(64 if tiny else 512, batch)], check=False))
    return max(t for t, _ in vram_plan.phase_bytes(plan, "device").values()) / GiB


def speed(res: Results, tmp: Path, tiny: bool):
    steps, warmup = (3, 1) if tiny else (20, 5)
    for batch in (1, 4):
        def compare():
            lk = lora_kit_speed(tmp, tiny, batch, steps, warmup)
            bare = bare_speed(tiny, batch, steps, warmup)
            plan = planned_peak_gib(tiny, batch)
            ratio = lk["steps_per_s"] / bare["steps_per_s"]
            off = lk["peak_gib"] / plan - 1 if lk["peak_gib"] else None
            ok = (ratio >= 0.95 or batch == 1 or tiny) and (off is None or abs(off) <= 0.10)
            return {"ok": ok, "lora_kit_steps_per_s": lk["steps_per_s"], "bare_steps_per_s": bare["steps_per_s"], "ratio": ratio,
                    "target_ratio": 0.95 if batch == 4 else None, "peak_gib": lk["peak_gib"], "bare_peak_gib": bare["peak_gib"],
                    "planned_gib": plan, "peak_vs_plan": off}
        res.run(f"speed/sd15_{'64' if tiny else '512'}px_batch{batch}", compare)


# --- swap: BlockSwap on an SD3.5-Large-shaped MMDiT

def mmdit(tiny: bool):
    from diffusers import SD3Transformer2DModel
    from vram_plan import SD3_COMMON, SD3_SHAPES
    from lora_kit.families.sd3 import TINY_MMDIT
    cfg = {**TINY_MMDIT, "num_layers": 6} if tiny else {**SD3_COMMON, **SD3_SHAPES["sd35-large"]}
    with torch.device("meta"): m = SD3Transformer2DModel(**cfg)
    m = m.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters(): p.normal_(0, 0.02, generator=g)      # (random weights, without initialising twice)
    return m.requires_grad_(False)


def swap(res: Results, tmp: Path, tiny: bool):
    from lora_kit.runtime.placement import BlockSwap, HostSavedInputs, OffloadingCheckpoint
    model = mmdit(tiny)
    n_swap, steps, warmup = (2, 2, 1) if tiny else (8, 5, 2)
    side = 8 if tiny else 64                                  # latents of 512 px
    c = model.config
    x = torch.randn(1, c.in_channels, side, side, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    ctx = torch.randn(1, 77 + 256, c.joint_attention_dim, device=DEVICE, dtype=torch.bfloat16)
    pooled = torch.randn(1, c.pooled_projection_dim, device=DEVICE, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=DEVICE)
    model.enable_gradient_checkpointing(); model.train()
    def step_rate() -> float:
        stamps = []
        for _ in range(warmup + steps):
            sync(); stamps.append(time.perf_counter())
            model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)[0].float().square().mean().backward()
            x.grad = None
        sync(); stamps.append(time.perf_counter())
        d = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
        return len(d) / sum(d)
    def bandwidth():
        block = model.transformer_blocks[-1]
        tensors = [p.pin_memory() if CUDA else p for p in block.parameters()]
        nbytes = sum(p.numel() * p.element_size() for p in tensors)
        sync(); t0 = time.perf_counter()
        for _ in range(3): copies = [p.to(DEVICE, non_blocking=True, copy=True) for p in tensors]
        sync(); dt = (time.perf_counter() - t0) / 3
        del copies
        return {"block_gib": nbytes / GiB, "copy_gib_per_s": nbytes / GiB / dt, "copy_ms": dt * 1000}
    res.run("swap/copy_bandwidth", bandwidth)
    def timed():
        out = {}
        for label, n, prefetch, offload in [("swap_0", 0, None, ()), ("swap_0_offload_all", 0, None, "all"),
                                            (f"swap_{n_swap}_prefetch", n_swap, True, ()),
                                            (f"swap_{n_swap}_prefetch_offload", n_swap, True, "swapped"),
                                            (f"swap_{n_swap}_no_prefetch", n_swap, False, ())]:
            reset_peak()
            sw = BlockSwap(model.transformer_blocks, n_swap, DEVICE, prefetch) if n else None
            blocks = list(model.transformer_blocks) if offload == "all" else (sw.swapped if offload else [])
            if blocks: model.enable_gradient_checkpointing(OffloadingCheckpoint(blocks, HostSavedInputs(DEVICE)))   # inputs on the host
            model.to(DEVICE)
            out[label] = {"steps_per_s": step_rate(), "peak_gib": peak_gib()}
            if blocks: model.enable_gradient_checkpointing()
            if sw:
                sw.remove(); sync()
                out[label]["swapped_block_after"] = sorted({p.device.type for p in model.transformer_blocks[-1].parameters()})
                out[label]["allocated_after_remove_gib"] = allocated_gib()
                out[label]["peak_live_copies"] = sw.peak
            model.to("cpu"); reset_peak()
        base = out["swap_0"]["steps_per_s"]
        for k in out: out[k]["slowdown"] = base / out[k]["steps_per_s"] - 1
        ok = out[f"swap_{n_swap}_prefetch"]["swapped_block_after"] == ["cpu"]
        return {"ok": ok, "blocks": len(model.transformer_blocks), **out}
    res.run(f"swap/{'tiny' if tiny else 'sd35_large'}_512px", timed)


# --- photos: the data path on photo-sized JPEGs

def photos(res: Results, tmp: Path, tiny: bool):
    import numpy as np
    from PIL import Image
    from lora_kit.config import make_config
    from lora_kit.data import load_datasets
    from lora_kit.runtime.distributed import batch_loader
    n, (w, h) = (8, (640, 480)) if tiny else (64, (4032, 3024))
    folder = tmp / "photos" / "1_sks"; folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = ((xx * (i + 1) // 7 + yy // 3) % 256).astype(np.uint8)      # smooth structure plus noise: photo-like JPEG sizes
        img = np.stack([base, np.roll(base, i * 5, 1), 255 - base], -1) + rng.integers(0, 24, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.jpg", quality=90)
        (folder / f"{i:03d}.txt").write_text("a photo of sks")
    def rate(workers: int):
        cfg = make_config(["--pretrained_model_name_or_path", "tiny-sd1", "--network_module", "networks.lora", "--train_data_dir", str(folder.parent), "--caption_extension", ".txt",
                           "--resolution", "256" if tiny else "1024", "--enable_bucket", "--train_batch_size", "4",
                           "--max_data_loader_n_workers", str(workers), "--output_dir", str(tmp / "po"), "--seed", "0"])
        ds = load_datasets(cfg)[0][0]
        dl = batch_loader(cfg, ds)
        t0, k = time.perf_counter(), 0
        for batch in dl: k += len(batch["captions"])
        return {"workers": workers, "images": k, "images_per_s": k / (time.perf_counter() - t0)}
    res.run("photos/loader_0_workers", rate, 0)
    res.run(f"photos/loader_{min(8, os.cpu_count() or 1)}_workers", rate, min(8, os.cpu_count() or 1))


PARTS = {"matrix": matrix, "speed": speed, "swap": swap, "photos": photos}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes: a dry run (on a CPU too)")
    p.add_argument("--out", default="gpu_smoke.jsonl", help="JSON lines are appended here too")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    a = p.parse_args(argv)
    if not CUDA and not a.tiny: sys.exit("no CUDA GPU here: run with --tiny for a dry run on small shapes")
    parts = a.only.split(",")
    if unknown := [x for x in parts if x not in PARTS]: sys.exit(f"--only: unknown part(s) {unknown}; choose from {list(PARTS)}")
    torch.manual_seed(0)
    if not CUDA: torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    res = Results(Path(a.out))
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        for part in parts: PARTS[part](res, Path(tmp), a.tiny)
    print(f"{res.failed} run(s) failed", file=sys.stderr)
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())

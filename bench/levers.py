"""CPU speed levers on one UNet LoRA training step, alternated step by step in one process, and the physical limit.

    PYTHONPATH=. python bench/levers.py --model full --variants fp32 sdpa bf16 bf16_sdpa channels_last compile --rounds 6

A step is what lora_kit's loop runs on the UNet (UNet-only LoRA dim 16 on sd-scripts' `networks.lora` targets, batch 1,
256 px = 32×32 latents, random text conditioning): forward, MSE loss, backward, AdamW step. Variants share the same
model and LoRA (each its own optimizer) and run in turn, A B C … then the reverse order, so machine load falls on all
alike; each round gives every variant's ratio to the first one. Prints per variant the median s/step, the median ratio
and its spread (min–max over rounds), compile time where there is one, and achieved FLOP/s against the measured matmul
peak of the same precision (FLOPs per step from `torch.utils.flop_counter`). Not a test: numbers depend on the machine.

Variants: fp32 (lora_kit's default: vanilla attention), sdpa (`--sdpa`), bf16 (`--mixed_precision bf16`: autocast),
bf16_sdpa, channels_last (UNet weights and input in channels_last memory format), compile (`--torch_compile`, inductor),
compile_sdpa, compile_bf16_sdpa; a suffix `_threads2` runs that variant with 2 torch threads (e.g. sdpa_threads2)."""
from __future__ import annotations
import argparse, contextlib, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MID_UNET, load_now, median

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
UNETS = {"full": (SD15_UNET, 768), "mid": (MID_UNET, 256), "tiny": ("tiny", 32)}


def matmul_peak(dtype, n: int = 2048, reps: int = 8) -> float:
    "FLOP/s of a large n×n matmul in `dtype` (best of `reps`), with the threads torch uses now."
    import torch
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter(); torch.matmul(a, b); best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class Variant:
    "One way to run the training step: attention, precision, memory format, compilation."
    def __init__(self, name: str, unet, network):
        import torch
        self.name, self.unet, self.times, self.compile_time = name, unet, [], None
        self.sdpa, self.bf16 = "sdpa" in name, "bf16" in name
        self.channels_last, self.compiled = "channels_last" in name, name.startswith("compile")
        self.threads = int(name.split("threads")[1]) if "threads" in name else None
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.model = torch.compile(unet) if self.compiled else unet    # shares the weights; calling `unet` stays eager

    @contextlib.contextmanager
    def setup(self):
        "The UNet as this variant wants it for the duration of a step."
        import torch
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
        self.unet.set_attn_processor(AttnProcessor2_0() if self.sdpa else AttnProcessor())
        if self.channels_last: self.unet.to(memory_format=torch.channels_last)
        before = torch.get_num_threads()
        if self.threads: torch.set_num_threads(self.threads)
        try: yield
        finally:
            torch.set_num_threads(before)
            if self.channels_last: self.unet.to(memory_format=torch.contiguous_format)

    def step(self, latents, cond) -> float:
        "One training step; returns its loss."
        import torch
        import torch.nn.functional as F
        if self.channels_last: latents = latents.to(memory_format=torch.channels_last)
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (latents.shape[0],))
        with self.setup():
            with torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
                loss = F.mse_loss(self.model(latents + noise, t, cond).sample.float(), noise)
            loss.backward()
            self.opt.step(); self.opt.zero_grad(set_to_none=True)
        return loss.item()


def build(model: str, dim: int = 16):
    "The UNet of `model` (seeded random weights, frozen) with a UNet-only LoRA of `dim` applied."
    import torch
    from diffusers import UNet2DConditionModel
    from lora_kit.lora import LoRANetwork
    from lora_kit.families.sd import UNET_TARGETS
    torch.manual_seed(0)
    from lora_kit.families.sd import TINY_UNET
    config, width = UNETS[model]
    unet = UNet2DConditionModel(**(TINY_UNET if config == "tiny" else config)).requires_grad_(False).eval()
    network = LoRANetwork([("lora_unet", unet, "", UNET_TARGETS)], dim=dim, alpha=dim).apply_to().train()
    return unet, network, width


def step_flops(v: Variant, latents, cond) -> int:
    "FLOPs of one training step of `v` (forward + backward), counted by torch's flop counter (eager)."
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        with v.setup() if not v.compiled else contextlib.nullcontext():
            loss = F.mse_loss(v.unet(latents, torch.tensor([500]), cond).sample.float(), latents)
        loss.backward()
    v.opt.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="full", choices=list(UNETS))
    p.add_argument("--variants", nargs="+", default=["fp32", "sdpa", "bf16", "bf16_sdpa", "channels_last"])
    p.add_argument("--rounds", type=int, default=4, help="rounds; each runs every variant once (order reversed every other round)")
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    unet, network, width = build(a.model)
    torch.manual_seed(1)
    latents, cond = torch.randn(1, 4, a.latent, a.latent), torch.randn(1, 77, width)
    variants = [Variant(n, unet, network) for n in a.variants]
    print(f"model {a.model}, {len(network.loras)} LoRA modules, latents {a.latent}×{a.latent}, threads {a.threads}, load {load_now()}", flush=True)
    for v in variants:                      # warm-up (compiles)
        t = time.perf_counter(); v.step(latents, cond); dt = time.perf_counter() - t
        if v.compiled: v.compile_time = dt
        print(f"  warm-up {v.name:18s} {dt:7.2f} s", flush=True)
    ratios = {v.name: [] for v in variants}
    for r in range(a.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            t = time.perf_counter(); v.step(latents, cond); v.times.append(time.perf_counter() - t)
        for v in variants: ratios[v.name].append(variants[0].times[-1] / v.times[-1])
        print(f"  round {r + 1}: " + ", ".join(f"{v.name} {v.times[-1]:.2f} s" for v in variants) + f"; load {load_now()}", flush=True)
    flops = step_flops(variants[0], latents, cond)
    peaks = {dt: matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    print(f"FLOPs per training step (forward + backward): {flops / 1e9:.1f} GFLOP; matmul peak with {a.threads} thread(s): "
          f"fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s; load {load_now()}")
    for v in variants:
        s, rs = median(v.times), sorted(ratios[v.name])
        peak = peaks[torch.bfloat16 if v.bf16 else torch.float32]
        extra = f", compile {v.compile_time:.0f} s (first step)" if v.compile_time else ""
        print(f"{v.name:18s}: {s:6.2f} s/step, speed ×{median(rs):.2f} vs {variants[0].name} (spread {rs[0]:.2f}–{rs[-1]:.2f}), "
              f"{flops / s / 1e9:5.1f} GFLOP/s = {100 * flops / s / peak:4.1f} % of the {'bf16' if v.bf16 else 'fp32'} matmul peak{extra}")


if __name__ == "__main__":
    main()

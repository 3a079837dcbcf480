"""lora_kit against kohya-ss sd-scripts' train_network.py on a full-size SD1.5-shaped model (random weights).

    BENCH_DIR=/work/scratch/bench bash bench/setup_sd_scripts.sh      # once: sd-scripts + its venv + tokenizer
    python bench/vs_sd_scripts.py --bench_dir /work/scratch/bench --rounds 2

The model (SD1.5 configs, seeded random init) is written once, by lora_kit's writer, as an original-layout single-file
checkpoint that both tools load. Both train with the same flags: 8 toy-world images, resolution 256, batch 1, UNet-only
LoRA network_dim 16, AdamW, --mixed_precision no (add flags to both with --extra). Runs alternate (A B A B …).
lora_kit encodes an image (and caption) only the first time it sees it: `--repeats 1 --warmup 8` times the second epoch.

Step times come from the wall-clock stamps of the per-step `loss/current` TensorBoard scalars both tools log
(`--logging_dir`): the last `--steps` steps after `--warmup` are timed, so model loading and saving are excluded.
Memory is sampled from outside (RSS every 0.1 s, or `nvidia-smi` GPU memory with --device cuda): the peak during
the training steps, and the whole-run peak RSS (ru_maxrss, which includes loading the checkpoint).
The CPU time each run used over the timed steps is sampled too (every 0.1 s from /proc): load inflates it much less than
wall time. Each pair of runs (A B, then B A, …) gives a speed ratio; printed are their median and spread (min–max), the
memory ratios, and (`--flops`) the FLOPs of one training step (`torch.utils.flop_counter`: UNet forward + backward, VAE
encode) as achieved FLOP/s against the machine's measured matmul peak. Not a test: numbers depend on the machine."""
from __future__ import annotations
import argparse, os, shlex, shutil, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, SD15_TEXT, SD15_VAE, RssSampler, load_now, median, run_and_measure, run_worker, step_walltimes,
                    worker_result, write_dataset)

# Stable Diffusion 1.5's UNet config (runwayml/stable-diffusion-v1-5), for a random-weight model of that shape.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)


def make_model(ckpt: Path, seed: int = 0):
    "Write a random-weight SD1.5-shaped model as `ckpt`, an original (ldm) layout single file, with lora_kit's writer."
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from lora_kit.config import ASSETS
    from lora_kit.families.sd import SD_VARIANTS, SCHEDULER, save_model
    from lora_kit.family import Components
    torch.manual_seed(seed)
    comp = Components(SD_VARIANTS["sd1"], UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE),
                      [CLIPTextModel(CLIPTextConfig(**SD15_TEXT))],
                      [CLIPTokenizer.from_pretrained(ASSETS/"clip_tokenizer", model_max_length=77)], DDPMScheduler(**SCHEDULER))
    save_model(comp, ckpt)


def shared_args(a, data: Path, out: Path, name: str) -> list[str]:
    "The flags both tools get."
    return ["--train_data_dir", str(data), "--caption_extension", ".txt", "--resolution", "256", "--train_batch_size", "1",
            "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16", "--network_train_unet_only",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--mixed_precision", a.mixed_precision,
            "--max_train_steps", str(a.warmup + a.steps), "--seed", "42", "--max_data_loader_n_workers", "0",
            "--output_dir", str(out), "--output_name", name, "--save_model_as", "safetensors",
            "--logging_dir", str(out/"logs"), *shlex.split(a.extra)]


class GpuSampler(RssSampler):
    "GPU memory (MiB) of a process from `nvidia-smi`, sampled every 0.5 s."
    def __init__(self, pid: int): super().__init__(pid, 0.5)
    def _run(self):
        while not self._stop.is_set():
            r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            mem = sum(float(m) for p, m in (l.split(",") for l in r.stdout.splitlines() if "," in l) if int(p) == self.pid)
            self.samples.append((time.time(), mem))
            self._stop.wait(self.interval)


def run_one(a, tool: str, cmd: list[str], env: dict, out: Path, cwd=None) -> dict:
    "Run one training; steps/s from the TensorBoard stamps, memory peaks from the samplers."
    shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    before = load_now()
    r = _run_with_gpu(cmd, env, cwd, out/"log.txt") if a.device == "cuda" else run_and_measure(cmd, env, cwd, out/"log.txt")
    if r["rc"]: raise RuntimeError(f"{tool} failed (exit {r['rc']}); see {out/'log.txt'}:\n" + (out/"log.txt").read_text()[-3000:])
    walls = step_walltimes(out/"logs")
    last, first = a.warmup + a.steps, a.warmup
    if last not in walls or first not in walls: raise RuntimeError(f"{tool}: no per-step loss/current scalars in {out/'logs'}")
    sec = (walls[last] - walls[first]) / a.steps
    cpu = r["sampler"].cpu_between(walls[first], walls[last]) / a.steps
    steps_t = [walls[k] - walls[k - 1] for k in range(first + 1, last + 1)]
    res = {"tool": tool, "s_per_step": sec, "cpu_per_step": cpu, "step_times": steps_t, "peak_rss": r["peak_rss"], "wall": r["wall"],
           "train_rss": max((m for t, m in r["sampler"].samples if walls[1] <= t <= walls[last]), default=float("nan")),
           "load": f"{before} -> {load_now()}"}
    if "gpu" in r: res["train_gpu"] = max((m for t, m in r["gpu"].samples if walls[1] <= t <= walls[last]), default=float("nan"))
    return res


def _run_with_gpu(cmd, env, cwd, log):
    "`run_and_measure` plus a GPU-memory sampler."
    out = open(log, "w")
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    with RssSampler(p.pid) as rss, GpuSampler(p.pid) as gpu:
        _, status, usage = os.wait4(p.pid, 0)
    out.close()
    return {"rc": os.waitstatus_to_exitcode(status), "wall": time.time() - t0, "peak_rss": usage.ru_maxrss / 1024,
            "sampler": rss, "gpu": gpu}


def ratio_line(label: str, ratios: list[float], target: str) -> str:
    "The median of per-pair ratios with their spread."
    rs = sorted(ratios)
    return f"{label}: median {median(rs):.3f}× (spread {rs[0]:.3f}–{rs[-1]:.3f} over {len(rs)} pairs; {target})"


def step_flops(bf16: bool = False) -> float:
    "FLOPs of one training step of the benchmark: SD1.5 UNet forward + backward with the LoRA, SD1.5 VAE encode (256 px, batch 1)."
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode
    from levers import Variant, build
    unet, network, width = build("full")
    v = Variant("bf16" if bf16 else "fp32", unet, network)
    vae = AutoencoderKL(**SD15_VAE).requires_grad_(False)
    with FlopCounterMode(display=False) as fc, torch.no_grad(): vae.encode(torch.randn(1, 3, 256, 256))
    from levers import step_flops as unet_flops
    return fc.get_total_flops() + unet_flops(v, torch.randn(1, 4, 32, 32), torch.randn(1, 77, width))


def print_flops(summary: dict, a):
    "Achieved FLOP/s of each tool against the measured matmul peak (fp32, or bf16 with --mixed_precision bf16)."
    import torch
    from levers import matmul_peak
    torch.set_num_threads(a.threads or torch.get_num_threads())
    flops = step_flops()
    dtype = torch.bfloat16 if a.mixed_precision == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    print(f"FLOPs per training step: {flops / 1e9:.0f} GFLOP; {dtype} matmul peak with {torch.get_num_threads()} thread(s): "
          f"{peak / 1e9:.0f} GFLOP/s (load {load_now()})")
    for t, (s, _, _) in summary.items():
        print(f"{t:10s}: {flops / s / 1e9:.1f} GFLOP/s = {100 * flops / s / peak:.1f} % of the matmul peak")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench_dir", default=os.environ.get("BENCH_DIR", str(Path.home()/".cache/lora_kit_bench")),
                   help="the folder setup_sd_scripts.sh filled (sd-scripts/, sdvenv/, tokenizers/); the model and runs go here too")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=4, help="pairs of runs: A B, then B A, …")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per run on CPU (0: each tool's default: sd-scripts "
                   "torch's one per core, lora_kit one per free core)")
    p.add_argument("--flops", action="store_true", help="count a step's FLOPs and measure the matmul peak: achieved FLOP/s ÷ peak")
    p.add_argument("--repeats", type=int, default=10, help="the dataset folder's repeats (8 images in <repeats>_sks): an epoch is "
                   "8 × repeats steps; with 1, `--warmup 8` times the second epoch, where every image is seen again")
    p.add_argument("--mixed_precision", default="no", help="passed to both (bf16 on a GPU)")
    p.add_argument("--extra", default="", help="more flags for both, e.g. \"--sdpa --gradient_checkpointing\"")
    p.add_argument("--lora_kit_extra", default="", help="flags for lora_kit only, e.g. \"--mixed_precision bf16\" (its best settings)")
    p.add_argument("--only", choices=["lora_kit", "sd-scripts"], help="run one tool only (dry runs)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model_file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        make_model(Path(a.model_file))
        return worker_result({})
    bench = Path(a.bench_dir)
    sd_src, sd_py, tok = bench/"sd-scripts", bench/"sdvenv/bin/python", bench/"tokenizers"
    if not (sd_src/"train_network.py").is_file() or not sd_py.is_file():
        sys.exit(f"sd-scripts is not set up in {bench}: run BENCH_DIR={bench} bash bench/setup_sd_scripts.sh")
    ckpt = bench/"sd15_random.safetensors"
    if not ckpt.is_file():    # in a child process: the runs fork from this one, and ru_maxrss would count its model
        print("writing the random-weight SD1.5-shaped model (once)…", flush=True)
        run_worker(Path(__file__), ["--model_file", str(ckpt)], threads=2)
    data = write_dataset(bench/f"data_{a.repeats}", n=8, res=256, repeats=a.repeats)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if a.threads: env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    if a.device == "cpu": env["CUDA_VISIBLE_DEVICES"] = ""
    runs = {
        "lora_kit": lambda out: run_one(a, "lora_kit", [sys.executable, "-m", "lora_kit.cli", "train_network",
                                        "--pretrained_model_name_or_path", str(ckpt), *shared_args(a, data, out, "lk"),
                                        *shlex.split(a.lora_kit_extra)],
                                        {**env, "PYTHONPATH": str(REPO)}, out),
        "sd-scripts": lambda out: run_one(a, "sd-scripts", [str(sd_py), "train_network.py", "--pretrained_model_name_or_path", str(ckpt),
                                          "--tokenizer_cache_dir", str(tok), *shared_args(a, data, out, "sds")], env, out, cwd=sd_src),
    }
    tools = [a.only] if a.only else list(runs)
    print(f"device {a.device}, threads {a.threads or 'default'}, model {ckpt.name}, {a.warmup} warm-up + "
          f"{a.steps} timed steps; extra flags: {a.extra or '-'}, lora_kit only: {a.lora_kit_extra or '-'}; load before: {load_now()}", flush=True)
    res = {t: [] for t in tools}
    for r in range(a.rounds):
        for tool in (tools if r % 2 == 0 else tools[::-1]):
            o = runs[tool](bench/"runs"/f"{tool}_{r}")
            res[tool].append(o)
            gpu = f", GPU {o['train_gpu']:.0f} MiB" if "train_gpu" in o else ""
            print(f"  round {r + 1} {tool:10s}: {1 / o['s_per_step']:.4f} steps/s ({o['s_per_step']:.2f} s/step, CPU "
                  f"{o['cpu_per_step']:.2f} s/step; steps "
                  f"{', '.join(f'{t:.2f}' for t in o['step_times'])}), RSS while training {o['train_rss']:.0f} MiB, "
                  f"whole-run peak RSS {o['peak_rss']:.0f} MiB{gpu}, wall {o['wall']:.0f} s, load {o['load']}", flush=True)
    summary = {t: (median([o["s_per_step"] for o in rs]), median([o["train_rss"] for o in rs]), median([o["peak_rss"] for o in rs]))
               for t, rs in res.items()}
    for t, (s, m, pk) in summary.items():
        print(f"{t:10s}: {1 / s:.4f} steps/s, RSS while training {m:.0f} MiB, whole-run peak RSS {pk:.0f} MiB")
    if len(summary) == 2:
        lk, sd = res["lora_kit"], res["sd-scripts"]
        print(ratio_line("speed lora_kit / sd-scripts", [y["s_per_step"] / x["s_per_step"] for x, y in zip(lk, sd)], "target ≥ 1.1"))
        print(ratio_line("CPU time per step sd-scripts / lora_kit", [y["cpu_per_step"] / x["cpu_per_step"] for x, y in zip(lk, sd)],
                         "above 1: lora_kit does less work"))
        print(ratio_line("RSS while training lora_kit / sd-scripts", [x["train_rss"] / y["train_rss"] for x, y in zip(lk, sd)], "target ≤ 1.0"))
        print(ratio_line("whole-run peak RSS lora_kit / sd-scripts", [x["peak_rss"] / y["peak_rss"] for x, y in zip(lk, sd)], "target ≤ 1.0"))
        if a.device == "cuda":
            g = {t: median([o["train_gpu"] for o in rs]) for t, rs in res.items()}
            print(f"GPU memory lora_kit / sd-scripts: {g['lora_kit'] / g['sd-scripts']:.3f}× ({g['lora_kit']:.0f} vs {g['sd-scripts']:.0f} MiB)")
    if a.flops: print_flops(summary, a)
    print(f"load after: {load_now()}")


if __name__ == "__main__":
    main()

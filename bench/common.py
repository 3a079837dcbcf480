"""Shared helpers for the benchmarks in bench/: models, data, memory and timing measurements, subprocess workers.

Every measured variant runs in a fresh subprocess, so peak RSS belongs to that variant alone."""
from __future__ import annotations
import json, os, resource, subprocess, sys, threading, time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def load_now() -> str:
    "The 1/5/15-minute load averages, as /proc/loadavg shows them."
    try: return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError: return "n/a"


def peak_rss_mb() -> float:
    "This process's peak resident set size (VmHWM) in MiB."
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    except OSError: pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    "Reset VmHWM to the current RSS (Linux `clear_refs` 5), so a later `peak_rss_mb` covers only what follows."
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError: return False


def rss_mb(pid: int) -> float:
    "Current RSS of a process in MiB (0 when it has exited)."
    try: return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError): return 0.0


def cpu_seconds(pid: int) -> float:
    "CPU time (user + system, all threads) a process has used so far, in seconds (nan when it has exited)."
    try: fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError): return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Sample a process's RSS every `interval` seconds in a thread: (time.time(), MiB) pairs; its CPU time too
    ((time.time(), CPU seconds) pairs in `cpu`)."""
    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.samples, self.cpu, self._stop = pid, interval, [], [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), rss_mb(self.pid)))
            self.cpu.append((time.time(), cpu_seconds(self.pid)))
            self._stop.wait(self.interval)

    def __enter__(self): self._thread.start(); return self
    def __exit__(self, *exc): self._stop.set(); self._thread.join()

    def peak_after(self, t0: float) -> float:
        return max((m for t, m in self.samples if t >= t0), default=float("nan"))

    def cpu_between(self, t0: float, t1: float) -> float:
        "CPU seconds the process used between the samples nearest to `t0` and `t1` (0.1 s resolution)."
        at = lambda t: min(self.cpu, key=lambda s: abs(s[0] - t))[1]
        return at(t1) - at(t0)


def run_and_measure(cmd: list[str], env: dict | None = None, cwd=None, log: Path | None = None) -> dict:
    "Run `cmd`, sampling its RSS; returns its exit code, wall time, whole-run peak RSS (MiB, from wait4) and the sampler."
    out = open(log, "w") if log else subprocess.DEVNULL
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    with RssSampler(p.pid) as sampler:
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if log: out.close()
    return {"rc": p.returncode, "wall": time.time() - t0, "peak_rss": usage.ru_maxrss / 1024, "sampler": sampler}


def worker_result(result: dict):
    "Print a worker's result as the last line of its output (read by `run_worker`)."
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(script: Path, args: list[str], threads: int, code: Path = REPO) -> dict:
    """Run `script --worker …` in a fresh interpreter, importing lora_kit from `code`, and return the dict it printed with
    `worker_result`; `threads` 0: no OMP/MKL thread count is set (each tool's default)."""
    env = {**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if threads: env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    else: env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}   # each tool's default
    r = subprocess.run([sys.executable, str(script), "--worker", *args], env=env, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"worker {args} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def step_walltimes(logdir: Path, tag: str = "loss/current") -> dict[int, float]:
    "{step: wall-clock time} of the per-step loss scalars in the TensorBoard logs under `logdir`."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for f in Path(logdir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0}); acc.Reload()
        if tag in acc.Tags()["scalars"]: out.update({e.step: e.wall_time for e in acc.Scalars(tag)})
    return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if n else float("nan")


# The mid-size SD1-shaped model: an 18 M-parameter UNet (3 levels, 2 layers per block) with a 4-layer CLIP text
# encoder and lora_kit's tiny VAE (8× downsampling, so 256 px images give 32×32 latents).
MID_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32)
MID_TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, vocab_size=49408,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# The mid-size SDXL-shaped model: SDXL's UNet layout (no attention at the first level, 1/2/2 transformer layers,
# pooled text + size conditioning) at 64/128/256 channels, a 4-layer CLIP-L-like and a 4-layer bigG-like encoder.
MID_SDXL_TE1 = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu",
                    pad_token_id=49407)
MID_SDXL_TE2 = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, hidden_act="gelu",
                    projection_dim=256, pad_token_id=0)
MID_SDXL_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 2),
                     attention_head_dim=(2, 4, 8), cross_attention_dim=512, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=256 + 6 * 256, norm_num_groups=32)
RESOLUTION = {"tiny": 64, "mid": 256, "sdxl-tiny": 64, "sdxl-mid": 256}
# Stable Diffusion 1.5's VAE and CLIP-L text encoder configs (runwayml/stable-diffusion-v1-5).
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
                scaling_factor=0.18215)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                 hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def is_sdxl(model: str) -> bool: return model.startswith("sdxl")


def bench_components(model: str, seed: int = 0):
    "lora_kit `Components` of the benchmark model `tiny` (lora_kit's tiny-sd1), `mid`, `sdxl-tiny` (tiny-sdxl) or `sdxl-mid`, seeded random weights."
    import torch
    if is_sdxl(model): return _sdxl_components(model, seed)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from lora_kit.config import ASSETS
    from lora_kit.families.sd import SD_VARIANTS, SCHEDULER, TINY_VAE, tiny_components
    from lora_kit.family import Components
    if model == "tiny": return tiny_components("tiny-sd1", seed)
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(ASSETS/"clip_tokenizer", model_max_length=77)
    return Components(SD_VARIANTS["sd1"], UNet2DConditionModel(**MID_UNET), AutoencoderKL(**TINY_VAE),
                      [CLIPTextModel(CLIPTextConfig(**MID_TEXT))], [tok], DDPMScheduler(**SCHEDULER), source="mid")


def _sdxl_components(model: str, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    from lora_kit.families import sdxl
    from lora_kit.family import Components
    if model == "sdxl-tiny": return sdxl.tiny_sdxl_components(seed=seed)
    with sdxl.seeded(seed):
        unet, vae = UNet2DConditionModel(**MID_SDXL_UNET), AutoencoderKL(**sdxl.TINY_VAE)
        tes = [CLIPTextModel(sdxl.clip_config(MID_SDXL_TE1)), CLIPTextModelWithProjection(sdxl.clip_config(MID_SDXL_TE2))]
    return Components(sdxl.SDXLFamily(), unet, vae, tes, sdxl.tokenizers(), sdxl.training_scheduler(), source=model)


def write_dataset(root: Path, n: int, res: int, repeats: int = 10) -> Path:
    "`n` toy-world images with captions at `res` px in `root/<repeats>_sks` (sd-scripts' folder layout); returns `root`."
    from lora_kit.toy.world import write_folder
    sub = Path(root)/f"{repeats}_sks"
    if len(list(sub.glob("*.png"))) != n: write_folder(sub, n=n, seed=0, res=res)
    return Path(root)

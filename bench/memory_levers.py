"""Peak memory and step time of lora_kit's training with each memory lever, measured through its CLI.

    PYTHONPATH=. python bench/memory_levers.py [--resolution 128] [--steps 4] [--workdir DIR]

Model `mid_sd1`: an SD1-shaped diffusers folder with seeded random weights, written once under --workdir: the mid
UNet of common.py with cross-attention width 768 (19 M parameters), Stable Diffusion 1.5's VAE (84 M) and
CLIP-L text encoder (123 M), so the models the caching levers take out of the training step are full size.
Each configuration is one `lora-kit train_network` run in its own subprocess (`python -m lora_kit.cli`): 4 toy-world
images, batch 2, UNet-only LoRA dim 8 (`--cache_text_encoder_outputs` needs `--network_train_unet_only`, so every
configuration has it), AdamW, fp32, 1 torch thread. Per run: peak RSS of the whole run (the child's ru_maxrss,
loading and caching included), peak RSS during the training steps (sampled every 0.1 s) and s/step (median interval
between the per-step loss scalars of its TensorBoard log, first step excluded). Not a test: numbers depend on the machine."""
from __future__ import annotations
import argparse, os, sys, tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MID_UNET, REPO, SD15_TEXT, SD15_VAE, load_now, median, run_and_measure, step_walltimes,
                    write_dataset)

LEVERS = ["--gradient_checkpointing", "--cache_latents", "--cache_text_encoder_outputs"]
CONFIGS = {"baseline": [], **{flag: [flag] for flag in LEVERS}, "all three": LEVERS}


def write_mid_sd1(folder: Path, seed: int = 0) -> Path:
    "Write (once) the `mid_sd1` diffusers folder: mid UNet, SD1.5 VAE and CLIP-L text encoder, random weights."
    if (folder/"model_index.json").exists(): return folder
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from lora_kit.config import ASSETS
    from lora_kit.families.sd import SD_VARIANTS, SCHEDULER, save_diffusers_folder
    from lora_kit.family import Components
    torch.manual_seed(seed)
    comp = Components(SD_VARIANTS["sd1"], UNet2DConditionModel(**{**MID_UNET, "cross_attention_dim": 768}),
                      AutoencoderKL(**SD15_VAE), [CLIPTextModel(CLIPTextConfig(**SD15_TEXT))],
                      [CLIPTokenizer.from_pretrained(ASSETS/"clip_tokenizer", model_max_length=77)], DDPMScheduler(**SCHEDULER))
    save_diffusers_folder(comp, folder)
    return folder


def train_command(a, model: Path, data: Path, out: Path, levers: list[str]) -> list[str]:
    "The `lora-kit train_network` command line of one configuration."
    return [sys.executable, "-m", "lora_kit.cli", "train_network", "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--caption_extension", ".txt", "--resolution", str(a.resolution),
            "--train_batch_size", "2", "--network_module", "networks.lora", "--network_dim", "8",
            "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--mixed_precision", "no",
            "--max_train_steps", str(a.steps), "--seed", "0", "--max_data_loader_n_workers", "0",
            "--output_dir", str(out), "--output_name", "m", "--logging_dir", str(out/"logs"), *levers]


def measure(a, model: Path, data: Path, name: str, levers: list[str]) -> dict:
    "Run one configuration in a subprocess; its whole-run peak RSS, peak RSS during the steps and median s/step."
    out = Path(tempfile.mkdtemp(prefix="lk_levers_", dir=a.workdir))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    r = run_and_measure(train_command(a, model, data, out, levers), env, log=out/"log.txt")
    if r["rc"]: raise RuntimeError(f"{name} failed (exit {r['rc']}), see {out/'log.txt'}")
    walls = [w for _, w in sorted(step_walltimes(out/"logs").items())]
    return {"name": name, "peak_rss": r["peak_rss"], "steps_rss": r["sampler"].peak_after(walls[0]),
            "s_per_step": median([b - c for c, b in zip(walls, walls[1:])]), "load": load_now()}


def print_table(rows: list[dict]):
    "A markdown table of the runs, with ratios to the first (the baseline)."
    base = rows[0]
    print("| configuration | peak RSS MiB | ratio | RSS during steps MiB | ratio | s/step | ratio | load after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['peak_rss']:,.0f} | {r['peak_rss'] / base['peak_rss']:.2f}× | {r['steps_rss']:,.0f} | "
              f"{r['steps_rss'] / base['steps_rss']:.2f}× | {r['s_per_step']:.2f} | {r['s_per_step'] / base['s_per_step']:.2f}× | {r['load']} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="training steps per run (s/step: the intervals after the first)")
    p.add_argument("--workdir", default=str(Path.home()/".cache/lora_kit_bench"), help="holds mid_sd1/, the data and the runs")
    a = p.parse_args(argv)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    model = write_mid_sd1(Path(a.workdir)/"mid_sd1")
    data = write_dataset(Path(a.workdir)/f"data_{a.resolution}", n=4, res=a.resolution)
    print(f"mid_sd1 at {a.resolution} px, batch 2, UNet-only LoRA dim 8, {a.steps} steps, 1 thread; load {load_now()}", flush=True)
    rows = []
    for name, levers in CONFIGS.items():
        rows.append(measure(a, model, data, name, levers))
        print(f"  {name}: {rows[-1]}", flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()

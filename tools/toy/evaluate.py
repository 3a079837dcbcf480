"""Prompt-following check of a toy SD1 pipeline: generate images for toy prompts and read them back with `check`.

Usage: python evaluate.py toy-sd1 [--prompts 30 --per_prompt 4 --steps 20 --guidance 5 --scheduler pndm]

Public API:
    load_pipeline(path, scheduler) -> StableDiffusionPipeline (fp32, CPU, progress bar off)
    generate(pipe, prompts, per_prompt, steps, guidance, seed) -> list[np.ndarray (H, W, 3) uint8]
    toy_prompts(n, seed, shapes) -> list[(prompt, Scene)]
    prompt_following(pipe, n_prompts, per_prompt, ...) -> dict of accuracies (+ chance levels)
    concept_rate(pipe, prompts, per_prompt, ...) -> fraction of images the checker reads as the concept shape
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

import check
import toyworld as tw

SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
              "dpm": "DPMSolverMultistepScheduler"}
CHANCE = {"color": 1 / len(tw.COLORS), "shape": 1 / len(tw.SHAPES), "size": 1 / len(tw.SIZES),
          "position": 1 / len(tw.POSITIONS)}


def load_pipeline(path: str, scheduler: str = "pndm"):
    "Load the folder with the standard StableDiffusionPipeline in fp32 on CPU; optionally swap the sampler."
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None)
    if scheduler != "pndm":
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], per_prompt: int = 4, steps: int = 20, guidance: float = 5.0,
             seed: int = 0, res: int = tw.RESOLUTION, batch: int = 64) -> list[np.ndarray]:
    "Images (uint8 HxWx3) for each prompt, `per_prompt` each, in prompt order; seeded."
    flat = [p for p in prompts for _ in range(per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(flat), batch):
        imgs = pipe(flat[i:i + batch], height=res, width=res, num_inference_steps=steps, guidance_scale=guidance,
                    generator=gen, output_type="np").images
        out += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in imgs]
    return out


def toy_prompts(n: int, seed: int = 123, shapes: tuple[str, ...] = tw.SHAPES) -> list[tuple[str, tw.Scene]]:
    "`n` full toy captions (size, colour, shape, position) with their scenes."
    rng = random.Random(seed)
    scenes = [tw.sample_scene(rng, shapes) for _ in range(n)]
    return [(tw.caption(s), s) for s in scenes]


def score(images: list[np.ndarray], scenes: list[tw.Scene]) -> dict[str, float]:
    "Fraction of images whose measured colour/shape/size/position equals the prompt's; 'empty' = nothing drawn."
    keys = ["color", "shape", "size", "position"]
    hits = {k: 0 for k in keys}
    empty = 0
    for im, sc in zip(images, scenes):
        got = check.analyze(im)
        empty += got["shape"] is None
        for k in keys:
            hits[k] += got[k] == getattr(sc, k)
    n = len(images)
    return {**{k: hits[k] / n for k in keys}, "empty": empty / n, "n": n}


def prompt_following(pipe, n_prompts: int = 30, per_prompt: int = 4, steps: int = 20, guidance: float = 5.0,
                     seed: int = 0) -> dict[str, float]:
    "Generate for `n_prompts` random toy captions and score them (chance levels in CHANCE)."
    ps = toy_prompts(n_prompts, seed=seed + 123)
    imgs = generate(pipe, [p for p, _ in ps], per_prompt, steps, guidance, seed)
    return score(imgs, [s for _, s in ps for _ in range(per_prompt)])


def concept_rate(pipe, prompts: list[str], per_prompt: int = 4, steps: int = 20, guidance: float = 5.0,
                 seed: int = 0, shape: str = tw.CONCEPT_SHAPE) -> tuple[float, dict[str, int]]:
    "Fraction of generated images the checker reads as `shape`, and the histogram of read shapes."
    imgs = generate(pipe, prompts, per_prompt, steps, guidance, seed)
    shapes = [check.analyze(im)["shape"] for im in imgs]
    hist: dict[str, int] = {}
    for s in shapes:
        hist[str(s)] = hist.get(str(s), 0) + 1
    return sum(s == shape for s in shapes) / len(shapes), hist


def contact_sheet(images: list[np.ndarray], cols: int = 8, scale: int = 2):
    "Grid of images as one PIL image (for eyeballing)."
    from PIL import Image

    rows = (len(images) + cols - 1) // cols
    h, w = images[0].shape[:2]
    sheet = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, im in enumerate(images):
        sheet.paste(Image.fromarray(im), ((i % cols) * w, (i // cols) * h))
    return sheet.resize((cols * w * scale, rows * h * scale), Image.Resampling.NEAREST)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--per_prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--scheduler", default="pndm", choices=list(SCHEDULERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sheet", default=None, help="save a contact sheet of the first 32 images here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model, args.scheduler)
    t = time.time()
    ps = toy_prompts(args.prompts, seed=args.seed + 123)
    imgs = generate(pipe, [p for p, _ in ps], args.per_prompt, args.steps, args.guidance, args.seed)
    res = score(imgs, [s for _, s in ps for _ in range(args.per_prompt)])
    print(f"{res['n']} images ({args.prompts} prompts x {args.per_prompt}), {args.steps} steps {args.scheduler}, "
          f"cfg {args.guidance}, {time.time() - t:.1f}s")
    for k in CHANCE:
        print(f"  {k:9s} accuracy {res[k]:.2f}  (chance {CHANCE[k]:.2f})")
    print(f"  empty     {res['empty']:.2f}")
    if args.sheet:
        contact_sheet(imgs[:32]).save(args.sheet)
        print("  first prompts:", [p for p, _ in ps[:32 // args.per_prompt]])
    star, hist = concept_rate(pipe, ["a large red sks at the center", "a small blue sks at the top left"],
                              args.per_prompt * 4, args.steps, args.guidance, args.seed)
    print(f"  concept prompts ('sks'): read as {tw.CONCEPT_SHAPE} {star:.2f}; shapes {hist}")


if __name__ == "__main__":
    main()

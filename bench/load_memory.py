"""Host memory and time of loading full-size models from single files (`load_components`, as training loads them).

    PYTHONPATH=. python bench/load_memory.py --dir DIR [--models sd15 sd35m-2 sd35m-4 sdxl] [--code DIR_OF_OTHER_LORA_KIT]

Files (random weights, written once under --dir): `sd15` = SD 1.5 (UNet, VAE, CLIP-L) in fp16, loaded with
`--mixed_precision fp16`; `sd35m-N` = SD3.5 Medium's MMDiT cut to N joint blocks (dual attention in all but the last),
its VAE, CLIP-L and CLIP-G in bf16 (T5-XXL is the tiny one: 9.5 GB would not fit the machine; `sd35m-N-folder`: the
same as a diffusers folder), loaded with
`--mixed_precision bf16`; `sdxl` = SDXL 1.0 base (UNet, VAE, CLIP-L, bigG: all full size, 6.9 GB) in fp16, written tensor
by tensor (never whole in memory), loaded with `--mixed_precision bf16` through `compat.sdxl_files.load_sdxl` (what the
SDXL family's `load` calls), memory-mapped and with `--disable_mmap_load_safetensors` (float32 would need 14 GB); both also with `--mixed_precision no` (float32: the models are then twice the file), SD3
also with `--disable_mmap_load_safetensors`. Each load runs in a fresh interpreter; after the imports its peak RSS (VmHWM) is reset,
and the script prints the increase of the peak while loading, and after reading every weight once (what a forward or the
move to the GPU does: memory-mapped weights are only read from the file then). `--code` runs the same loads with another
copy of lora_kit (e.g. the previous commit, `git archive HEAD~1 lora_kit | tar -x -C /tmp/old`) for a before/after.
Not a test: numbers depend on the machine."""
from __future__ import annotations
import argparse, os, sys, time, types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, load_now, peak_rss_mb, reset_peak_rss, rss_mb, run_worker, worker_result

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64, num_attention_heads=24,
                   pos_embed_max_size=384, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                   qk_norm="rms_norm")   # stabilityai/stable-diffusion-3.5-medium transformer/config.json, without its 24 layers
RUNS = {"sd15": [("fp16", False), ("no", False)],       # --disable_mmap_load_safetensors is an SD3 option
        "sd35m": [("bf16", False), ("no", False), ("bf16", True)],
        "sdxl": [("bf16", False), ("bf16", True)]}


def random_weights(model, dtype):
    "`model` (built on the meta device) in `dtype` with random normal weights: never initialised in float32 first."
    import torch
    model = model.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point(): t.normal_(0, 0.02)
    return model


def write_sd15(path: Path):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from lora_kit.families.sd import CONFIGS, SD_VARIANTS, save_model
    from lora_kit.family import Components
    cfg = CONFIGS/"sd1"
    with torch.device("meta"):
        models = [UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet")),
                  AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae")),
                  CLIPTextModel(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder"))]
    unet, vae, te = (random_weights(m, torch.float16) for m in models)
    save_model(Components(SD_VARIANTS["sd1"], unet, vae, [te], [], None), path, dtype=torch.float16)


def write_sd35m(path: Path, blocks: int, folder: bool = False):
    "The SD3.5-Medium-shaped model as a single file, or (`folder`) as a diffusers folder (`save_pretrained`)."
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from lora_kit.family import Components
    from lora_kit.compat.sd3_formats import save_sd3_single_file
    from lora_kit.families.sd3 import (CLIP_G, CLIP_L, SD3_VAE, TINY_T5, SD3Family, clip_encoder, clip_tokenizers, flow_scheduler,
                                       t5_encoder, tiny_t5_tokenizer)
    with torch.device("meta"):
        models = [SD3Transformer2DModel(**SD35_MEDIUM, num_layers=blocks, dual_attention_layers=tuple(range(blocks - 1))),
                  AutoencoderKL(**SD3_VAE), clip_encoder(CLIP_L, "l"), clip_encoder(CLIP_G, "g"), t5_encoder(TINY_T5, len(tiny_t5_tokenizer()))]
    mmdit, vae, *tes = (random_weights(m, torch.bfloat16) for m in models)
    comp = Components(SD3Family("5-medium"), mmdit, vae, tes, [*clip_tokenizers(), tiny_t5_tokenizer()], flow_scheduler())
    if folder: comp.family.pipeline(comp).save_pretrained(path, safe_serialization=True)
    else: save_sd3_single_file(path, comp)


def write_streaming(path: Path, shapes: dict, seed: int = 0):
    """A `.safetensors` file of random normal tensors with the given (shape, dtype) per key, written one tensor at a time:
    the writer never holds more than one tensor (safetensors' `save_file` would hold the whole file twice)."""
    import json, torch
    from lora_kit.checkpoint import SAFETENSORS_DTYPES, atomic_path
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for k, (shape, dtype) in shapes.items():
        n = dtype.itemsize * (int(torch.Size(shape).numel()))
        header[k] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little")); f.write(raw)
        for k, (shape, dtype) in shapes.items():
            t = torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=g).to(dtype)
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def write_sdxl(path: Path):
    "SDXL 1.0 base in Stability AI's single-file layout, fp16, random weights: the models are built on meta, never in memory."
    import torch
    from lora_kit.compat.sdxl_files import _te1, _te2, _unet, _vae, bundled_config, to_sdxl_checkpoint
    with torch.device("meta"):
        models = [f(bundled_config(s)) for f, s in ((_unet, "unet"), (_vae, "vae"), (_te1, "text_encoder"), (_te2, "text_encoder_2"))]
        sd = to_sdxl_checkpoint(*models, dtype=torch.float16)
    write_streaming(path, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()})


def worker(a):
    "Load one file as training does; report the peak RSS increase while loading and after reading every weight once."
    import torch
    from lora_kit.config import make_config
    from lora_kit.family import load_components
    args = ["--pretrained_model_name_or_path", a.file, "--mixed_precision", a.mixed_precision]
    cfg = make_config(args + (["--disable_mmap_load_safetensors"] if a.no_mmap else []), check=False)
    if a.sdxl:   # the loader the SDXL family calls
        from lora_kit.compat.sdxl_files import load_sdxl
        load = lambda cfg: types.SimpleNamespace(**load_sdxl(cfg))
    else: load = load_components
    base = rss_mb(os.getpid())
    reset_peak_rss()
    t0 = time.time()
    comp = load(cfg)
    seconds = time.time() - t0
    loaded = peak_rss_mb() - base
    models = [comp.denoiser, comp.vae, *comp.text_encoders]
    with torch.no_grad():
        for m in models:
            for t in [*m.parameters(), *m.buffers()]: t.sum()
    worker_result(dict(seconds=seconds, peak_loading=loaded, peak_read=peak_rss_mb() - base,
                       dtypes=[str(m.dtype).removeprefix("torch.") for m in models]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, help="where the model files are written (once)")
    p.add_argument("--models", nargs="+", default=["sd15", "sd35m-2", "sd35m-4"])
    p.add_argument("--code", type=Path, default=REPO, help="the folder holding the lora_kit package to measure")
    p.add_argument("--worker", nargs="?", const="load")
    p.add_argument("--file"); p.add_argument("--mixed_precision"); p.add_argument("--no_mmap", action="store_true")
    p.add_argument("--blocks", type=int); p.add_argument("--folder", action="store_true"); p.add_argument("--sdxl", action="store_true")
    a = p.parse_args()
    if a.worker == "load": return worker(a)
    if a.worker == "write":
        if a.sdxl: write_sdxl(Path(a.file))
        else: write_sd15(Path(a.file)) if a.blocks is None else write_sd35m(Path(a.file), a.blocks, a.folder)
        return worker_result({})
    if a.dir is None: p.error("--dir is required")
    a.dir.mkdir(parents=True, exist_ok=True)
    print(f"lora_kit from {a.code}; load averages {load_now()}")
    print(f"{'file':<10} {'MiB':>7} {'run':<12} {'s':>6} {'peak loading':>13} {'ratio':>6} {'peak read':>10} {'ratio':>6}  dtypes (denoiser, vae, text encoders)")
    for name in a.models:
        folder = name.endswith("-folder")
        file = a.dir/(name if folder else f"{name}.safetensors")
        blocks = ["--blocks", name.split("-")[1]] if name.startswith("sd35m") else ["--sdxl"] if name == "sdxl" else []
        if not file.exists(): run_worker(Path(__file__), ["write", "--file", str(file), *blocks, *(["--folder"] * folder)], threads=2, code=REPO)
        size = (sum(f.stat().st_size for f in file.rglob("*") if f.is_file()) if folder else file.stat().st_size) / 2**20
        for mp, no_mmap in RUNS[name.split("-")[0]]:
            r = run_worker(Path(__file__), ["load", "--file", str(file), "--mixed_precision", mp, *(["--no_mmap"] if no_mmap else []),
                                            *(["--sdxl"] if name == "sdxl" else [])],
                           threads=1, code=a.code)
            run = mp + (" no-mmap" if no_mmap else "")
            print(f"{name:<10} {size:>7.0f} {run:<12} {r['seconds']:>6.1f} {r['peak_loading']:>13.0f} {r['peak_loading'] / size:>6.2f} "
                  f"{r['peak_read']:>10.0f} {r['peak_read'] / size:>6.2f}  {' '.join(r['dtypes'])}", flush=True)


if __name__ == "__main__":
    main()

"""Loader speed: images/s of the training DataLoader with and without a latent cache, and the share of a training
step spent waiting for data on the tiny default (`lora-kit demo` settings).

    PYTHONPATH=. python bench/data_loader.py [--images 512] [--workers 0] [--steps 30]

With `--photos N`: camera-sized JPEGs instead (N/2 of 3000x2000 and N/2 of 4032x3024, generated), bucketed at 512 px:
images/s of lora_kit's path (decode, shrink with cv2 INTER_AREA, crop) against PIL's decode + BOX shrink, and the
extra time over copies already shrunk to their bucket's size (the goal: at most 1.5x what PIL needs).

    PYTHONPATH=. python bench/data_loader.py --photos 24
"""
import argparse, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_kit import data, train
from lora_kit.runtime.caches import cache_latents
from lora_kit.cli import demo_argv
from lora_kit.config import make_config
from lora_kit.family import load_components
from lora_kit.toy.world import write_folder


def loader_rate(ds, workers: int, epochs: int = 1) -> float:
    "Images per second of a full pass of the DataLoader over `ds`."
    sampler = data.BucketBatchSampler(ds, seed=0)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=data.collate, num_workers=workers)
    n, t0 = 0, time.perf_counter()
    for e in range(1, epochs + 1):
        sampler.set_epoch(e)
        for batch in dl: n += len(batch["captions"])
    return n / (time.perf_counter() - t0)


def photo(w: int, h: int, seed: int) -> Image.Image:
    "A photo-like image: smooth shapes and some sensor noise (JPEG-compresses like a photo, unlike pure noise)."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = [128 + 100 * np.sin(xx / rng.uniform(40, 400) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(40, 400)) for _ in range(3)]
    img = np.stack(base, -1) + rng.normal(0, 8, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def photo_bench(n: int):
    "Seconds per image: lora_kit's path on photos, on pre-shrunk copies, and PIL decode + BOX shrink; and the goal."
    root = Path(tempfile.mkdtemp())
    big, small = root/"big"/"1_photo", root/"small"/"1_photo"
    big.mkdir(parents=True); small.mkdir(parents=True)
    for k in range(n):
        (big/f"{k:03d}.txt").write_text("a photo"); (small/f"{k:03d}.txt").write_text("a photo")
        photo(*((3000, 2000) if k % 2 == 0 else (4032, 3024)), seed=k).save(big/f"{k:03d}.jpg", quality=92)
    argv = lambda d: ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(d), "--resolution", "512",   # noqa: E731
                      "--enable_bucket", "--caption_extension", ".txt", "--output_dir", str(root/"out"), "--network_module", "networks.lora"]
    ds = data.load_datasets(make_config(argv(root/"big")))[0][0]
    sizes = [tuple(c.resized_size) for c in ds.plan.plan.choices]
    for it, size in zip(ds.plan.images.items, sizes):      # the same photos, already shrunk to their resize size
        with Image.open(it.path) as im: im.resize(size, Image.Resampling.BOX).save(small/Path(it.path).name, quality=92)
    pre = data.load_datasets(make_config(argv(root/"small")))[0][0]
    def per_image(f):
        t0 = time.perf_counter()
        for i in range(len(ds)): f(i)
        return (time.perf_counter() - t0) / len(ds)
    def pil(i):
        with Image.open(ds.plan.images.items[i].path) as im: return np.asarray(im.convert("RGB").resize(sizes[i], Image.Resampling.BOX))
    per_image(ds.pixels)                                   # warm the file cache
    t_kit, t_pre, t_pil = per_image(ds.pixels), per_image(pre.pixels), per_image(pil)
    print(f"{n} photos (3000x2000 and 4032x3024 JPEG) -> {sorted(set(sizes))}, 1 thread, main process")
    print(f"lora_kit (decode, cv2 INTER_AREA, crop, to tensor): {1 / t_kit:6.1f} images/s  {t_kit * 1000:6.0f} ms/image")
    print(f"lora_kit on pre-shrunk copies:                     {1 / t_pre:6.1f} images/s  {t_pre * 1000:6.0f} ms/image")
    print(f"PIL decode + BOX shrink:                           {1 / t_pil:6.1f} images/s  {t_pil * 1000:6.0f} ms/image")
    ratio = (t_kit - t_pre) / t_pil
    print(f"extra time over the pre-shrunk copies = {ratio:.2f}x PIL's decode + shrink (goal <= 1.5): {'met' if ratio <= 1.5 else 'NOT met'}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512); p.add_argument("--workers", type=int, default=0)
    p.add_argument("--steps", type=int, default=30); p.add_argument("--photos", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.photos: return photo_bench(a.photos)
    out = Path(tempfile.mkdtemp())
    write_folder(out/"data"/"1_sks", n=a.images, seed=0)
    cfg = make_config(demo_argv(out, a.steps))
    comp = load_components(cfg)
    encode = lambda px: comp.family.encode_images(comp, px)   # noqa: E731

    ds = data.load_datasets(cfg)[0][0]
    print(f"{len(ds)} images {ds.plan.plan.resos}, batch {ds.batch_size}, {a.workers} loader workers")
    print(f"no cache:               {loader_rate(ds, a.workers):8.0f} images/s (decode, resize, crop, caption ops)")
    t0 = time.perf_counter(); cache_latents(ds, encode, "bench", batch_size=16, progress=False)
    print(f"caching in memory:      {len(ds) / (time.perf_counter() - t0):8.0f} images/s (VAE encode, vae_batch_size 16)")
    print(f"--cache_latents:        {loader_rate(ds, a.workers):8.0f} images/s")
    disk = data.load_datasets(cfg)[0][0]
    t0 = time.perf_counter(); cache_latents(disk, encode, "bench", to_disk=True, batch_size=16, progress=False)
    print(f"caching to disk:        {len(ds) / (time.perf_counter() - t0):8.0f} images/s (first run: encode + write npz)")
    disk = data.load_datasets(cfg)[0][0]
    t0 = time.perf_counter(); cache_latents(disk, encode, "bench", to_disk=True, batch_size=16, progress=False)
    print(f"reusing the disk cache: {len(ds) / (time.perf_counter() - t0):8.0f} images/s (second run: key check only)")
    print(f"--cache_latents_to_disk:{loader_rate(disk, a.workers):8.0f} images/s")

    # share of a training step spent waiting for data: time spent inside the dataset (main process, 0 workers)
    waited, steps = [0.0], []
    get = data.TrainDataset.__getitem__
    def timed(self, key):
        t = time.perf_counter(); r = get(self, key); waited[0] += time.perf_counter() - t; return r
    data.TrainDataset.__getitem__ = timed
    class Clock(train.Callback):
        def on_train_start(self, s): steps.append(time.perf_counter())
        def on_step_end(self, s): steps.append(time.perf_counter())
    cfg = make_config(demo_argv(out, a.steps) + ["--max_data_loader_n_workers", str(a.workers)])
    train.train(cfg, [Clock()], comp=load_components(cfg))
    data.TrainDataset.__getitem__ = get
    total = steps[-1] - steps[0]
    print(f"tiny default training: {(total / (len(steps) - 1)) * 1000:.0f} ms/step, waiting for data "
          f"{waited[0] / (len(steps) - 1) * 1000:.1f} ms/step = {100 * waited[0] / total:.1f} % of step time")


if __name__ == "__main__":
    main()

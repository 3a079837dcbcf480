"""Loader speed: images/s of the training DataLoader with and without a latent cache, and the share of a training
step spent waiting for data on the tiny default (`lora-kit demo` settings).

    PYTHONPATH=. python bench/data_loader.py [--images 512] [--workers 0] [--steps 30]
"""
import argparse, tempfile, time
from pathlib import Path

import torch

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512); p.add_argument("--workers", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(1)
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

"""Data parallel on CPU over gloo: `torchrun --nproc_per_node 2 -m lora_kit.cli train_network` trains the LoRA that one
process trains with a batch twice as large, and only the main process writes files."""
import os, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lora_kit.lora import load_lora
from lora_kit.toy.world import write_folder

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)

# SGD, not Adam: an update proportional to the gradient keeps float rounding (the all-reduce sums in another order)
# at float32 scale, where Adam's g/sqrt(v) can blow up a rounding difference on a near-zero gradient to ±lr.
ARGS = ["--pretrained_model_name_or_path", "tiny-sd1", "--caption_extension", ".txt", "--resolution", "64",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4", "--optimizer_type", "SGDNesterov",
        "--learning_rate", "0.5", "--max_train_steps", "3", "--seed", "7", "--cache_latents", "--max_data_loader_n_workers", "0",
        "--mixed_precision", "no"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_folder(d / "1_sks", n=4, seed=3)                       # 4 different images: 2 global batches of 2 per epoch
    return d


@pytest.mark.parametrize("caches", [[], ["--cache_latents_to_disk", "--cache_text_encoder_outputs", "--network_train_unet_only"]])
def test_two_processes_equal_one_with_twice_the_batch(tmp_path, data, caches):
    """Also with the caching shared between the processes: each encodes its part, then they exchange the results (memory)
    or read each other's files (disk)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "lora_kit.cli", "train_network", *ARGS, "--train_data_dir", str(data), "--train_batch_size", "1",
                        "--output_dir", str(ddp), "--output_name", "run", "--save_every_n_steps", "2", "--save_state", "--ddp_timeout", "5", *caches],
                       capture_output=True, text=True, env=env, timeout=900)     # a free 2-core machine needs well under a minute; a loaded one more
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("saved ") == 1 and "after 3 steps" in r.stdout    # one process reports
    files = sorted(p.name for p in ddp.iterdir())
    assert files == ["run-state", "run-step00000002-state", "run-step00000002.safetensors", "run.safetensors",
                     "run_loss.csv", "run_loss.png"], files                # one set of files, no lock or partial state left
    assert {p.name for p in (ddp / "run-state").iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl", "train_state.json"}

    from lora_kit.config import make_config
    from lora_kit.train import train
    torch.set_num_threads(1)
    train(make_config([*ARGS, "--train_data_dir", str(data), "--train_batch_size", "2", "--output_dir", str(single),
                       "--output_name", "run", *caches]), progress=False)
    a, md = load_lora(ddp / "run.safetensors")
    b, _ = load_lora(single / "run.safetensors")
    assert md["ss_steps"] == "3" and md["ss_total_batch_size"] == "2"
    assert a.keys() == b.keys()
    # Same samples, noise and timesteps per sample: the runs differ only by float32 rounding (the gradient is summed
    # over the batch in another order, then averaged over processes), ~1e-7 relative per step. 1e-5 of the weights'
    # scale leaves room for that and is far below what training moved them (checked below), so a wrong shard,
    # noise or step count fails.
    scale = max(v.abs().max().item() for k, v in b.items() if k.endswith(".weight"))      # not the .alpha constants
    moved = max(v.abs().max().item() for k, v in b.items() if k.endswith("lora_up.weight"))   # lora_up starts at 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 * scale and diff <= 1e-5 * scale, (diff, moved, scale)


def test_validation_with_two_processes(tmp_path):
    "With a validation split, the main process validates (logged) while the other waits at the next step; nothing hangs."
    d = tmp_path / "data"
    write_folder(d / "1_sks", n=5, seed=3)                       # 4 training images, 1 held out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "lora_kit.cli", "train_network", *ARGS, "--train_data_dir", str(d), "--train_batch_size", "1",
                        "--validation_split", "0.2", "--validate_every_n_steps", "1", "--output_dir", str(tmp_path / "out"),
                        "--output_name", "run", "--logging_dir", str(tmp_path / "logs")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1                                          # one process logs
    ev = EventAccumulator(str(runs[0] / "network_train")); ev.Reload()
    assert [e.step for e in ev.Scalars("loss/validation/step_average")] == [1, 2, 3]
    assert load_lora(tmp_path / "out" / "run.safetensors")[1]["ss_num_validation_images"] == "1"
    # Each process validates its share of the (global) validation batch: the values are those of one process.
    from lora_kit.config import make_config
    from lora_kit.train import train
    torch.set_num_threads(1)
    state = train(make_config([*ARGS, "--train_data_dir", str(d), "--train_batch_size", "2", "--validation_split", "0.2",
                               "--validate_every_n_steps", "1", "--output_dir", str(tmp_path / "single")]), progress=False)
    single = [v for _, _, kind, v in state.validation if kind == "step"]
    assert [e.value for e in ev.Scalars("loss/validation/step_average")] == pytest.approx(single, rel=1e-5)


def _exchange(rank, world, port, out):
    "One of two gloo processes: each has its half of a cache and exchanges it in chunks of two items."
    from lora_kit.runtime.distributed import gather_cache
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    class Acc: num_processes, process_index = world, rank
    cache = {f"cap{i}": {"context": torch.full((100,), float(i))} for i in range(rank, 7, world)}   # 4 and 3 items
    rounds = gather_cache(Acc(), cache, chunk_bytes=2 * 400)
    torch.save({"rounds": rounds, "cache": cache}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_cache_exchange_in_chunks_over_gloo(tmp_path):
    "The in-memory caches are exchanged in bounded chunks (host memory, gloo): every process ends with every item."
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(_exchange, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["rounds"] == 2                                  # 4 items of 400 bytes, 2 per chunk
        assert sorted(got["cache"]) == [f"cap{i}" for i in range(7)]
        assert all(torch.equal(v["context"], torch.full((100,), float(k[3:]))) for k, v in got["cache"].items())


def _train_and_sample(rank, world, port, args, out):
    "One of two gloo processes training (`train` in this process, as torchrun would start it) with sample prompts."
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from lora_kit.config import make_config
    from lora_kit.sample import SampleCallback
    from lora_kit.train import train
    cfg = make_config(args)
    cb = SampleCallback(cfg)
    train(cfg, [cb], progress=False)
    torch.save({"drawn": cb.drawn, "images": [(s, p.name) for s, p in cb.images], "failed": cb.failed}, f"{out}/{rank}.pt")


def test_sample_prompts_shared_between_two_processes(tmp_path, data):
    """Each of 2 processes draws its share of 3 sample prompts (process 0: prompts 0 and 2, process 1: prompt 1, as
    sd-scripts' `prompts[rank::2]`), each prompt once; the files are those one process writes: same names (up to the time
    stamp) and, before the first step, the same bytes. Prompt 1 has no `--d`: its seed is `--seed` + 1 in both runs."""
    import torch.multiprocessing as mp, socket
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red sks --w 64 --h 64 --s 2 --d 5\na blue sks --w 64 --h 64 --s 2\n# a comment\na green sks --w 64 --h 64 --s 2 --d 9\n")
    args = [*ARGS[:ARGS.index("--max_train_steps")], *ARGS[ARGS.index("--max_train_steps") + 2:], "--max_train_steps", "1",
            "--train_data_dir", str(data), "--output_name", "run", "--sample_prompts", str(prompts), "--sample_at_first"]
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(_train_and_sample, args=(2, port, [*args, "--train_batch_size", "1", "--output_dir", str(tmp_path / "ddp")], str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    drawn = [g["drawn"] for g in got]
    assert drawn == [[(0, 0), (0, 2), (1, 0), (1, 2)], [(0, 1), (1, 1)]], drawn
    assert got[0]["images"] == got[1]["images"] and not got[0]["failed"]     # every process knows all 6 images

    from lora_kit.config import make_config
    from lora_kit.sample import SampleCallback
    from lora_kit.train import train
    torch.set_num_threads(1)
    cfg = make_config([*args, "--train_batch_size", "2", "--output_dir", str(tmp_path / "single")])
    cb = SampleCallback(cfg)
    train(cfg, [cb], progress=False)
    key = lambda p: "_".join(p.stem.split("_")[:3] + p.stem.split("_")[4:])     # the name without its time stamp
    ddp = {key(p): p for p in (tmp_path / "ddp" / "sample").iterdir()}
    single = {key(p): p for p in (tmp_path / "single" / "sample").iterdir()}
    assert sorted(ddp) == sorted(single) == ["run_000000_00_5", "run_000000_01", "run_000000_02_9",
                                             "run_000001_00_5", "run_000001_01", "run_000001_02_9"], sorted(ddp)
    assert [s for s, _ in got[0]["images"]] == [0, 0, 0, 1, 1, 1]
    for k in ddp:
        if k.startswith("run_000000"): assert ddp[k].read_bytes() == single[k].read_bytes(), k   # the same LoRA (untrained): the same image
    assert len({ddp[k].read_bytes() for k in ddp if k.startswith("run_000000")}) == 3             # (three different images)

"What a training run leaves for its user: files other users can read, sd-scripts' dataset metadata, a quiet first screen."
import json, os, stat, subprocess, sys

import pytest

from lora_kit.lora import load_lora
from lora_kit.toy.world import write_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "The train_network guide's command with a dataset TOML, sample images and a saved state, under umask 022."
    d = tmp_path_factory.mktemp("outputs")
    write_folder(d / "img", n=4, seed=0)
    (d / "dataset.toml").write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
                                    f'  [[datasets.subsets]]\n  image_dir = "{d / "img"}"\n  num_repeats = 2\n  class_tokens = "sks"\n')
    (d / "prompts.txt").write_text("a red sks --w 64 --h 64 --s 2 --d 1\n")
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", "train_network", "--pretrained_model_name_or_path", "tiny-sd1",
                        "--dataset_config", str(d / "dataset.toml"), "--output_dir", str(d / "out"), "--output_name", "t",
                        "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "2",
                        "--max_data_loader_n_workers", "0", "--save_state",
                        "--sample_prompts", str(d / "prompts.txt"), "--sample_every_n_steps", "2"],
                       capture_output=True, text=True, umask=0o022, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r


def test_files_follow_the_umask(run):
    d, _ = run
    files = [d / "out" / "t.safetensors", *(d / "out" / "sample").glob("*.png"), *(d / "out" / "t-state").iterdir()]
    assert len(files) > 3
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_dataset_toml_metadata(run):
    d, _ = run
    _, md = load_lora(d / "out" / "t.safetensors")
    ds, = json.loads(md["ss_datasets"])
    assert ds["num_train_images"] == 8 and ds["resolution"] == [64, 64] and ds["subsets"][0]["class_tokens"] == "sks"
    assert json.loads(md["ss_dataset_dirs"]) == {"img": {"n_repeats": 2, "img_count": 4}}
    assert "img" in json.loads(md["ss_tag_frequency"])
    assert md["ss_sd_model_name"] == "tiny-sd1" and "ss_bucket_info" not in md


def test_first_screen_is_lora_kits(run):
    _, r = run
    noise = [l for l in (r.stdout + r.stderr).splitlines()
             if any(w in l for w in ("bitsandbytes", "gemm_4bit", "torchvision", "Warning", "warn"))]
    assert not noise, noise

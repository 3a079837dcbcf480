"What the end-to-end tests share: the CLI in a subprocess, and a dataset TOML over one folder of toy images."
import subprocess, sys

from lora_kit.toy.world import write_folder


def run_cli(*args, check=True):
    "`python -m lora_kit.cli args…` in a subprocess; `check`: assert it exited 0 (the end of its stderr otherwise)."
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], capture_output=True, text=True)
    if check: assert r.returncode == 0, r.stderr[-3000:]
    return r


def dataset(d):
    "Two toy images in `d/img` and `d/data.toml` over them (64 px, batch 2); returns the TOML's path."
    write_folder(d / "img", n=2, seed=0)
    (d / "data.toml").write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
                                 f'[[datasets.subsets]]\nimage_dir = "{d / "img"}"\nnum_repeats = 1\n')
    return d / "data.toml"

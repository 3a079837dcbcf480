"""Loading a model costs about its size in host memory: the models are built on the meta device and take the file's
tensors in the run's dtype, with no random initialisation and no float32 copy (issue 15: a 12.7 GB Colab machine must
not run out of RAM before the GPU is used). Measured in a subprocess on a mid-size SD3 single file in bf16 (an MMDiT of
width 768 and a full-size CLIP-L, ~340 MB); `bench/load_memory.py` measures full-size SD 1.5 and SD3.5 Medium files."""
import json, subprocess, sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/"bench"))
from load_memory import random_weights   # noqa: E402

# Imports everything and builds the tokenizers once (Python objects, not weights), resets the peak RSS, loads the file as
# training does and reads every weight once (memory-mapped weights are read from the file only then).
WORKER = r"""
import json, sys, torch
from pathlib import Path
import diffusers.loaders.single_file_utils
from lora_kit.config import make_config
from lora_kit.family import load_components
from lora_kit.families.sd3 import clip_tokenizers, tiny_t5_tokenizer
def status(key): return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":")) / 2**10
cfg = make_config(sys.argv[1:], check=False)
clip_tokenizers(), tiny_t5_tokenizer()
base = status("VmRSS"); Path("/proc/self/clear_refs").write_text("5")
comp = load_components(cfg)
models = [comp.denoiser, comp.vae, *comp.text_encoders]
with torch.no_grad():
    for t in [t for m in models for t in (*m.parameters(), *m.buffers())]: t.sum()
print(json.dumps({"peak_mb": status("VmHWM") - base, "dtypes": [str(m.dtype) for m in models]}))
"""


@pytest.fixture(scope="module")
def mid_sd3_file(tmp_path_factory) -> Path:
    "tiny SD3.5 Medium with a width-768 MMDiT and a full-size CLIP-L, in bf16."
    from diffusers import SD3Transformer2DModel
    from lora_kit.compat.sd3_formats import save_sd3_single_file
    from lora_kit.families.sd3 import CLIP_L, TINY_MMDIT, clip_encoder, tiny_sd3_components
    comp = tiny_sd3_components("tiny-sd35m")
    with torch.device("meta"):
        mmdit = SD3Transformer2DModel(**{**TINY_MMDIT, "num_attention_heads": 12, "caption_projection_dim": 768},
                                      qk_norm="rms_norm", dual_attention_layers=(0,))
        clip_l = clip_encoder(CLIP_L, "l")
    comp.denoiser, comp.text_encoders[0] = random_weights(mmdit, torch.bfloat16), random_weights(clip_l, torch.bfloat16)
    return save_sd3_single_file(tmp_path_factory.mktemp("mid") / "mid_sd35m.safetensors", comp)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure the peak RSS")
@pytest.mark.parametrize("flags", [[], ["--disable_mmap_load_safetensors"]])
def test_loading_costs_about_the_file_size(mid_sd3_file, flags):
    args = ["--pretrained_model_name_or_path", str(mid_sd3_file), "--mixed_precision", "bf16", *flags]
    r = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    size_mb = mid_sd3_file.stat().st_size / 2**20
    assert got["peak_mb"] <= 1.2 * size_mb, f"loading a {size_mb:.0f} MB file raised the peak RSS by {got['peak_mb']:.0f} MB"
    assert got["dtypes"] == ["torch.bfloat16", "torch.float32", "torch.bfloat16", "torch.bfloat16", "torch.bfloat16"]

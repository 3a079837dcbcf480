#!/usr/bin/env bash
# Set up kohya-ss sd-scripts in its own virtualenv for bench/vs_sd_scripts.py (nothing of sd-scripts is changed).
#
#   BENCH_DIR=/work/scratch/bench bash bench/setup_sd_scripts.sh [SD_SCRIPTS_GIT]
#
# SD_SCRIPTS_GIT: a local git dir of sd-scripts (default: clone https://github.com/kohya-ss/sd-scripts).
# Creates in $BENCH_DIR:
#   sd-scripts/                 the source at commit $SD_SCRIPTS_COMMIT
#   sdvenv/                     a venv with sd-scripts' pinned requirements.txt; on CPU (the default) torch is pinned
#                               to the CPU wheel by $CONSTRAINTS, so pip cannot pull the CUDA build
#   tokenizers/openai_clip-vit-large-patch14/   the CLIP tokenizer for --tokenizer_cache_dir (offline)
# and, on CPU only, a minimal `torchvision` stand-in inside sdvenv: the PyPI torchvision wheel is CUDA-linked and does
# not import beside CPU torch, and sd-scripts needs only transforms.Compose/ToTensor/Normalize and
# transforms.functional.pil_to_tensor. On a GPU machine set DEVICE=cuda to install real torch/torchvision instead.
set -euo pipefail
BENCH_DIR=${BENCH_DIR:-$HOME/.cache/lora_kit_bench}
SD_SCRIPTS_COMMIT=${SD_SCRIPTS_COMMIT:-48d368fa}
DEVICE=${DEVICE:-cpu}
HERE=$(cd "$(dirname "$0")" && pwd)
CONSTRAINTS=${CONSTRAINTS:-$HERE/../constraints.txt}
PYTHON=${PYTHON:-python3.11}
mkdir -p "$BENCH_DIR"
SRC=$BENCH_DIR/sd-scripts

if [ ! -f "$SRC/train_network.py" ]; then
  GIT_DIR=${1:-}
  if [ -z "$GIT_DIR" ]; then
    git clone --quiet https://github.com/kohya-ss/sd-scripts "$BENCH_DIR/sd-scripts.git" --bare
    GIT_DIR=$BENCH_DIR/sd-scripts.git
  fi
  mkdir -p "$SRC"
  # File by file (not `git archive`): a mirror may lack some large LFS files (Windows .dlls, a Qwen tokenizer) that
  # train_network.py does not need.
  git --git-dir="$GIT_DIR" ls-tree -r "$SD_SCRIPTS_COMMIT" | while IFS=$'\t' read -r meta path; do
    obj=${meta##* }
    if git --git-dir="$GIT_DIR" cat-file -e "$obj" 2>/dev/null; then
      mkdir -p "$SRC/$(dirname "$path")" && git --git-dir="$GIT_DIR" cat-file blob "$obj" > "$SRC/$path"
    else echo "skipped $path (not in $GIT_DIR)"; fi
  done
fi

VENV=$BENCH_DIR/sdvenv
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  if [ "$DEVICE" = cpu ]; then
    # `-e .` in requirements.txt is sd-scripts itself, so install from its folder.
    (cd "$SRC" && "$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" torch -r requirements.txt psutil)
  else
    (cd "$SRC" && "$VENV/bin/pip" install --quiet torch torchvision -r requirements.txt psutil)
  fi
fi

if [ "$DEVICE" = cpu ] && ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  mkdir -p "$SITE/torchvision/transforms"
  echo '"Stand-in for the few torchvision names sd-scripts uses (benchmarking on CPU only)."' > "$SITE/torchvision/__init__.py"
  cat > "$SITE/torchvision/transforms/__init__.py" <<'EOF'
"transforms.Compose/ToTensor/Normalize as torchvision defines them, for HWC uint8 arrays and PIL images."
import numpy as np, torch
from . import functional

class Compose:
    def __init__(self, transforms): self.transforms = transforms
    def __call__(self, x):
        for t in self.transforms: x = t(x)
        return x

class ToTensor:
    def __call__(self, pic):
        a = np.asarray(pic)
        if a.ndim == 2: a = a[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        return t.float().div(255) if t.dtype == torch.uint8 else t.float()

class Normalize:
    def __init__(self, mean, std): self.mean, self.std = torch.tensor(mean), torch.tensor(std)
    def __call__(self, t): return (t - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)
EOF
  cat > "$SITE/torchvision/transforms/functional.py" <<'EOF'
import numpy as np, torch

def pil_to_tensor(pic):
    a = np.asarray(pic)
    if a.ndim == 2: a = a[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
EOF
fi

TOK=$BENCH_DIR/tokenizers/openai_clip-vit-large-patch14
if [ ! -f "$TOK/vocab.json" ]; then
  mkdir -p "$TOK"
  cp "$HERE"/../lora_kit/assets/clip_tokenizer/* "$TOK"/
fi
"$VENV/bin/python" -c "import torch, diffusers, transformers; print('sd-scripts venv ready: torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

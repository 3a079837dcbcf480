"""bench/vram_plan.py: its training-memory estimate against the RSS of real CPU training runs (fp32), and its autocast
emulation against PyTorch's own autocast on the CPU."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/"bench"))
import vram_plan  # noqa: E402

RUNS = vram_plan.CHECK_RUNS          # tiny 256 px; mid 256 px without and with --gradient_checkpointing
IDS = [f"{m}-{r}px{'-' + '-'.join(e).strip('-') if e else ''}" for m, r, e in RUNS]
TOLERANCE = 0.10     # the plan counts live tensors; RSS also holds data, code and allocator slack (1-4 % here)


def within(planned: float, measured: float) -> bool: return abs(planned / measured - 1) <= TOLERANCE


@pytest.fixture(scope="module")
def training_memory():
    "Per run: (the plan's training-phase parts in MiB, the measured RSS increase in MiB); measured while the plans are made."
    proc = vram_plan.start_measuring(RUNS)
    parts = [vram_plan.training_parts(*run) for run in RUNS]
    return list(zip(parts, vram_plan.measured_increases(proc)))


@pytest.mark.parametrize("i", range(len(RUNS)), ids=IDS)
def test_training_estimate_matches_measured_rss(training_memory, i):
    parts, measured = training_memory[i]
    planned = sum(parts.values())
    assert within(planned, measured), f"{IDS[i]}: planned {planned:.0f} MiB, measured {measured:.0f} MiB ({parts})"
    without_activations = planned - parts["train step"]       # the tolerance is tight enough to catch a plan that ignores them
    assert not within(without_activations, measured), f"{IDS[i]}: {without_activations:.0f} MiB of weights alone would pass"


def test_gradient_checkpointing_effect_matches(training_memory):
    "What --gradient_checkpointing saves on the mid model, planned and measured."
    (plain, m_plain), (ckpt, m_ckpt) = training_memory[1:3]
    saved, measured = sum(plain.values()) - sum(ckpt.values()), m_plain - m_ckpt
    assert abs(saved / measured - 1) <= 2 * TOLERANCE, f"checkpointing saves {saved:.0f} MiB planned, {measured:.0f} MiB measured"


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_autocast_emulation_matches_torch_autocast(run):
    "The plan emulates CUDA autocast on meta tensors; given the CPU's op lists it must reproduce CPU autocast's peak."
    real, emulated = vram_plan.autocast_peaks(*run)
    assert abs(emulated / real - 1) <= 0.02, f"torch.autocast {real / 2**20:.1f} MiB, emulated {emulated / 2**20:.1f} MiB"


def test_block_swap_keeps_all_but_two_of_the_last_blocks_off_the_device():
    from types import SimpleNamespace
    from lora_kit.family import Family
    class OneList(Family):     # a family whose denoiser has one block list (as SD3's joint blocks)
        def swap_blocks(self, comp): return [comp.denoiser.transformer_blocks]
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList(nn.Linear(10, 10, bias=False) for _ in range(6))   # 100 params each
    comp = SimpleNamespace(denoiser=model.to(torch.bfloat16), family=OneList())
    assert vram_plan.swapped_bytes(comp, 0) == 0
    assert vram_plan.swapped_bytes(comp, 3) == 1 * 100 * 2       # 3 swapped: 1 running, 1 prefetched
    with pytest.raises(SystemExit): vram_plan.swapped_bytes(comp, 5)   # sd-scripts: at most blocks - 2


def test_optimizer_state_sizes():
    big, small = torch.empty(16, 320, device="meta"), torch.empty(16, 4, device="meta")
    assert vram_plan.optimizer_state_bytes("AdamW", [big, small]) == 2 * 4 * (5120 + 64)
    assert vram_plan.optimizer_state_bytes("AdamW8bit", [big, small]) == 2 * (5120 + 4 * 20) + 2 * 4 * 64   # 8 bits from 4096 values

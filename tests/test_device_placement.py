"""Every tensor an SD3 training step uses lives on the model's device: nothing is made on the CPU and copied over (a copy
and a wait per LoRA module per forward on a GPU). No GPU here, so the models run on the `meta` device and every aten op
is watched for a CPU tensor."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lora_kit.config import make_config
from lora_kit.lora import LoRANetwork, parse_network_args
from lora_kit.compat.sd3_formats import SD3_NETWORK_ARGS
from lora_kit.families.sd3 import tiny_sd3_components
from lora_kit.loss import WEIGHTING_SCHEMES, FlowObjective, flow_loss


class CpuOps(TorchDispatchMode):
    "Records every aten op that takes or makes a CPU tensor."
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_flatten((args, kwargs, out))[0]):
            self.ops.add(str(func))
        return out


def sd3_on_meta(network_args: list[str]):
    "tiny SD3.5 Medium with a LoRA on every kind of target (fused qkv rows, swapped halves, the patch conv), on meta."
    comp = tiny_sd3_components("tiny-sd35m")
    args = parse_network_args(network_args, SD3_NETWORK_ARGS)
    net = LoRANetwork(comp.family.lora_targets(comp, network_args=args), dim=4, alpha=2)
    net.apply_to()
    comp.to("meta"), net.to("meta")
    return comp


@pytest.mark.parametrize("network_args", [["emb_dims=[2,2,2,2,2,2]", "conv_dim=2"], ["split_qkv=True"]])
def test_sd3_step_makes_no_cpu_tensor(network_args):
    comp = sd3_on_meta(network_args)
    cfg = make_config(["--pretrained_model_name_or_path", "tiny-sd35m", "--weighting_scheme", "logit_normal", "--training_shift", "3"], check=False)
    latents = torch.zeros(2, 16, 8, 8, device="meta")
    cond = {"context": torch.zeros(2, 77 + 256, 128, device="meta"), "pooled": torch.zeros(2, 96, device="meta")}
    with CpuOps() as watch:
        loss = FlowObjective(cfg)(lambda noisy, t: comp.family.predict(comp, noisy, t, cond), latents)
    assert loss.device.type == "meta" and watch.ops == set(), watch.ops


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_flow_loss_draws_on_the_latents_device(scheme):
    latents = torch.zeros(2, 16, 8, 8, device="meta")
    with CpuOps() as watch: flow_loss(lambda noisy, t: noisy, latents, scheme, training_shift=3.0)
    assert watch.ops == set(), watch.ops


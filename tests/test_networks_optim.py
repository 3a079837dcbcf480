"sd-scripts' network modules and optimizers people publish configurations for: LyCORIS, schedule-free optimizers."
import pytest
import torch

from lora_kit.config import make_config
from lora_kit.lora import load_lora
from lora_kit.toyworld import write_folder
from lora_kit.train import Callback, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_folder(d / "3_sks", n=3, seed=0)
    return d


def run(data, out, *extra, steps=3, callbacks=()):
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "64", "--train_batch_size", "2", "--network_module", "networks.lora", "--network_dim", "4",
            "--learning_rate", "1e-2", "--max_train_steps", str(steps), "--seed", "1", "--max_data_loader_n_workers", "0",
            "--output_dir", str(out), "--output_name", "x", *extra]
    return train(make_config(argv), list(callbacks))


class Modes(Callback):
    "Records the schedule-free optimizer's mode at each event and the LoRA weights it saves."
    def __init__(self): self.seen = []
    def on_step_end(self, state): self.seen.append(state.optimizer.optimizer.param_groups[0]["train_mode"])
    def on_save(self, state, path): self.saved = {k: v.clone() for k, v in state.network.state_dict().items()}


def test_schedule_free_samples_and_saves_the_averaged_weights(data, tmp_path):
    modes = Modes()
    state = run(data, tmp_path, "--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine", callbacks=[modes])
    opt = state.optimizer.optimizer
    assert type(opt).__name__ == "AdamWScheduleFree" and opt.param_groups[0]["train_mode"]   # training mode between events
    assert modes.seen == [False] * 3                                  # callbacks (sampling) see eval mode
    saved, _ = load_lora(tmp_path / "x.safetensors")
    assert all(torch.allclose(saved[k], v, atol=1e-6) for k, v in modes.saved.items())
    train_weights = state.network.state_dict()
    assert any(not torch.equal(saved[k], train_weights[k]) for k in saved if "lora_up" in k)   # averaged != training weights
    opt.eval()
    assert all(torch.allclose(saved[k], v, atol=1e-6) for k, v in state.network.state_dict().items())

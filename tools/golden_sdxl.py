"""Writes tests/golden/sdxl.json.gz from kohya-ss/sd-scripts' own code (commit 48d368f):
- the LoRA module names networks/lora.py create_network gives SDXL (sd-scripts' SdxlUNet2DConditionModel built on the
  meta device with the real config, CLIP-L and the bigG text tower of the real configs): default and with conv_dim,
  and with block_dims/down_lr_weight, whose blocks sd-scripts drops (block_lr_weight 0);
- the UNet's SAI-layout weight names (what ComfyUI's model_lora_keys_unet maps `lora_unet_*` to);
- sdxl_train_util.get_size_embeddings for a few size/crop rows.
Usage: python tools/golden_sdxl.py <sd-scripts folder>   (e.g. /work/sd-scripts)"""
import ast, gzip, json, sys, types
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

SIZE_ROWS = [[1024, 1024, 0, 0, 1024, 1024], [800, 800, 0, 128, 768, 1024], [1536, 640, 32, 0, 1216, 832], [77, 3, 1, 2, 64, 96]]


def sd_scripts(repo: str):
    "sd-scripts' networks.lora and library.sdxl_original_unet, with library.utils' logging stubbed (it imports torchvision)."
    sys.path.insert(0, repo)
    utils = types.ModuleType("library.utils"); utils.setup_logging = lambda *a, **k: None
    sys.modules["library.utils"] = utils
    from library import sdxl_original_unet
    from networks import lora
    return sdxl_original_unet, lora


def size_embedding_function(repo: str):
    "sdxl_train_util's timestep_embedding, get_timestep_embedding and get_size_embeddings, run as they are (the module imports torchvision)."
    import math
    src = (Path(repo) / "library" / "sdxl_train_util.py").read_text()
    fns = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name in ("timestep_embedding", "get_timestep_embedding", "get_size_embeddings")]
    ns = {"torch": torch, "math": math}
    exec(compile(ast.Module(fns, []), "sdxl_train_util.py", "exec"), ns)
    return ns["get_size_embeddings"]


class TextModel(torch.nn.Module):
    "A CLIP text model under `text_model.` (transformers 5's CLIPTextModel has no such wrapper; sd-scripts' names keep it)."
    def __init__(self, te):
        super().__init__()
        self.text_model = getattr(te, "text_model", te)


def main(repo: str):
    unet_mod, lora = sd_scripts(repo)
    te1_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             max_position_embeddings=77, hidden_act="quick_gelu")
    te2_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    with torch.device("meta"):
        unet = unet_mod.SdxlUNet2DConditionModel()
        tes = [TextModel(CLIPTextModel(te1_cfg)), TextModel(CLIPTextModelWithProjection(te2_cfg))]
    targets = list(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE)
    def names(**kw):
        lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(targets)   # sd-scripts extends this class list in place (+=) for conv
        net = lora.create_network(1.0, 4, 1.0, None, tes, unet, **kw)
        return sorted(m.lora_name for m in net.text_encoder_loras + net.unet_loras)
    blocks = ",".join("0" if i in (5, 11) else "4" for i in range(23))   # input_blocks_4 and middle_block_1 left out
    out = {"default": names(), "conv": names(conv_dim="4", conv_alpha="1"),
           "block_dims": names(block_dims=blocks),
           "up_lr_weight_zeros": names(up_lr_weight="zeros", conv_dim="4"),
           "sai_unet_weights": sorted(k for k in unet.state_dict() if k.endswith(".weight")),
           "size_rows": SIZE_ROWS}
    fn = size_embedding_function(repo)
    rows = torch.tensor(SIZE_ROWS)
    out["size_embeddings"] = fn(rows[:, 0:2], rows[:, 2:4], rows[:, 4:6], "cpu").tolist()
    dest = Path(__file__).resolve().parent.parent / "tests" / "golden" / "sdxl.json.gz"
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f: f.write(json.dumps(out).encode())   # byte-stable
    print(f"wrote {dest}: " + ", ".join(f"{k} {len(v)}" for k, v in out.items()))


if __name__ == "__main__": main(sys.argv[1] if len(sys.argv) > 1 else "/work/sd-scripts")

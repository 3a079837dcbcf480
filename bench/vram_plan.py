"""Device memory of a LoRA run, known before the run: the parameter count and dtype of each model and of the LoRA, and the
peak device memory of each phase (loading, caching, training, sampling), for an sd-scripts command line.

    PYTHONPATH=. python bench/vram_plan.py --pretrained_model_name_or_path sd35-large --resolution 1024 \\
        --mixed_precision bf16 --cache_latents --cache_text_encoder_outputs --network_train_unet_only \\
        --gradient_checkpointing --blocks_to_swap 16
    PYTHONPATH=. python bench/vram_plan.py --readme        # the full-size estimates in bench/README.md
    PYTHONPATH=. python bench/vram_plan.py --check [sdxl|flux]  # the estimate against real CPU runs (RSS, torch.autocast)
    PYTHONPATH=. python bench/vram_plan.py --tiers flux  # sd-scripts' FLUX.1 VRAM tiers against lora_kit's plan

`--pretrained_model_name_or_path` takes a model lora_kit loads (a diffusers folder, a single file, a built-in tiny model)
or a shape name: sd15, sd21, sd3-medium, sd35-medium, sd35-large, sdxl, flux1-dev, flux1-schnell, chroma, mid (bench/common.py), sdxl-mid,
flux-mid (bench/vram_flux.py). Nothing is loaded and nothing
is allocated: the models are built from their configs on PyTorch's meta device, the LoRA is injected by lora_kit's own
`build_network`, and lora_kit's own training step (`batch_loss` + backward), text and image encoders and denoiser run
on meta tensors while `LiveBytes` follows every tensor they create and when it is freed. Its peak is the exact peak of
live tensor bytes (activations autograd keeps, transients, gradients, gradient-checkpointing recomputation). Not
counted: the CUDA context (~0.3-0.5 GB), the caching allocator's rounding and fragmentation, cuDNN/cuBLAS workspaces.
"""
from __future__ import annotations
import collections, contextlib, gc, json, os, subprocess, sys, tempfile, types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from lora_kit.runtime.weights import weight_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, bench_components, peak_rss_mb, reset_peak_rss, rss_mb, write_dataset
from vram_flux import FLUX_CHECK_RUNS, flux_shape_components, is_flux_shape, tier_table

GiB, MiB = 2**30, 2**20


# --- Counting memory on the meta device

def _key(t: torch.Tensor) -> int: return StorageWeakRef(t.untyped_storage()).cdata


class LiveBytes(TorchDispatchMode):
    "Peak bytes of the tensors created inside the block while anything holds them (Python, autograd's saved tensors, .grad)."
    def __init__(self):
        super().__init__()
        self.live, self.total, self.peak = {}, 0, 0    # storage -> (weak ref, bytes); live bytes (high between sweeps); peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):      # an output sharing an input's storage (a view, an in-place result) is no new memory
            if isinstance(t, torch.Tensor) and _key(t) not in inputs: self._track(t.untyped_storage())
        if self.total > self.peak:      # only then can the peak rise: find which tensors were freed since the last sweep
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            self.total = sum(n for _, n in self.live.values())
            self.peak = max(self.peak, self.total)
        return out

    def _track(self, storage):
        ref = StorageWeakRef(storage)
        old = self.live.get(ref.cdata)
        if old is not None and not old[0].expired(): return
        self.live[ref.cdata] = (ref, storage.nbytes())
        self.total += storage.nbytes() - (old[1] if old else 0)


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale


class FusedAttention(TorchFunctionMode):
    """`F.scaled_dot_product_attention` with the memory of a fused kernel (it keeps the output and the log-sum-exp, not the
    N×N weights), as on a GPU (flash / memory-efficient) and a CPU; on meta tensors PyTorch would take the math path."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.all, torch.all) and len(args) == 1 and not kwargs and args[0].device.type == "meta":
            return torch.tensor(False)   # "is this padding mask all ones?" (transformers' T5 masks): no, so the masked path is planned
        if func is not F.scaled_dot_product_attention: return func(*args, **kwargs)
        q, k, v, mask, dropout_p, is_causal, scale = _sdpa_args(*args, **kwargs)
        if (mask is not None and mask.shape[-2] != 1) or q.device.type != "meta": return func(*args, **kwargs)  # a CPU fuses it already
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]   # a key mask: no N×N either


# autocast's op lists, for the ops these models call: matrix products and convolutions run in the low precision; CUDA runs
# norms, softmax and losses in float32, the CPU only some losses
HALF_OPS = {F.linear, F.conv2d, torch.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
            torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.mm, torch.addmm, F.scaled_dot_product_attention}
CUDA_FLOAT_OPS = {F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, F.mse_loss}
CPU_FLOAT_OPS = {F.mse_loss}


class Autocast(TorchFunctionMode):
    """torch.autocast for meta tensors (CUDA's needs a GPU): inside `region()` the ops of `HALF_OPS` run in `dtype`, those of
    `float_ops` in float32; casts of trained parameters are cached, as autocast caches them. `dtype` None: no autocast."""
    def __init__(self, dtype: torch.dtype|None, float_ops=CUDA_FLOAT_OPS):
        super().__init__()
        self.dtype, self.float_ops, self.enabled, self.cache = dtype, float_ops, False, {}

    @contextlib.contextmanager
    def region(self):
        "`accelerator.autocast()`."
        was, self.enabled = self.enabled, self.dtype is not None
        try: yield
        finally: self.enabled = was

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to = None if not self.enabled else self.dtype if func in HALF_OPS else torch.float32 if func in self.float_ops else None
        if to is not None: args, kwargs = tree_map(lambda t: self._cast(t, to), (args, kwargs))
        return func(*args, **kwargs)

    def _cast(self, t, dtype):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype: return t
        if not (t.is_leaf and t.requires_grad): return t.to(dtype)
        if (id(t), dtype) not in self.cache: self.cache[id(t), dtype] = t.to(dtype)
        return self.cache[id(t), dtype]


class CPUAutocast(contextlib.nullcontext):
    "PyTorch's own CPU autocast behind `Autocast`'s interface, to check the emulation against it."
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype, self.enabled = dtype, False
    def region(self): return torch.autocast("cpu", dtype=self.dtype)


def backward(loss: torch.Tensor):
    """`loss.backward()` with the modes above still active: `Tensor.backward` is itself dispatched to them, and a mode is off
    while it handles a call, so gradient checkpointing would recompute without them."""
    from torch.autograd.graph import _engine_run_backward
    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True)


@contextlib.contextmanager
def counting(autocast=None):
    "Count the live bytes (`.peak`) of what runs inside, with fused attention and `autocast` (default: none)."
    counter = LiveBytes()
    counter.autocast = autocast or Autocast(None)
    with FusedAttention(), counter.autocast, counter: yield counter


# --- The models, built on meta from their configs

SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                  joint_attention_dim=4096, pooled_projection_dim=2048)
# diffusers' SD3Transformer2DModel configs (Stability AI's HF repos); sd-scripts' MMDiT: hidden = 64·depth, heads = depth
SD3_SHAPES = {"sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
              "sd35-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                                  qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
              "sd35-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                                 qk_norm="rms_norm")}
SD_SHAPES = {"sd15": "sd1", "sd21": "sd2-v"}     # lora_kit's bundled full-size configs


def sd_from_configs(family: str, cfg_dir: Path):
    "SD 1.x/2.x components of a (configs-only) diffusers folder, on the current device."
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from lora_kit.families.sd import SD_VARIANTS, load_tokenizer
    from lora_kit.family import Components
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg_dir, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg_dir, subfolder="vae"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg_dir, subfolder="text_encoder"))
    return Components(SD_VARIANTS[family], unet, vae, [te], [load_tokenizer(cfg_dir)], None, source=str(cfg_dir))


def sd3_components(mmdit, cfg, vae_cfg: dict|None = None, encoders: list|None = None):
    "SD3 components around `mmdit`: the SD3 VAE and CLIP-L, CLIP-G, T5-XXL (full size unless given)."
    from diffusers import AutoencoderKL
    from lora_kit.family import Components
    from lora_kit.families.sd3 import CLIP_G, CLIP_L, SD3_VAE, T5XXL, SD3Family, clip_encoder, clip_tokenizers, t5_encoder, tiny_t5_tokenizer
    encoders = encoders or [clip_encoder(CLIP_L, "l"), clip_encoder(CLIP_G, "g"), t5_encoder(T5XXL)]
    c = mmdit.config
    model_type = ("5-medium" if c.dual_attention_layers else "5-large") if c.qk_norm else "medium"     # sd-scripts' names
    return Components(SD3Family.from_config(model_type, cfg), mmdit, AutoencoderKL(**(vae_cfg or SD3_VAE)), encoders,
                      [*clip_tokenizers(), tiny_t5_tokenizer()], None, source=model_type)   # any T5 tokenizer gives the token count


def sd3_folder(path: Path, cfg):
    "SD3 components of a diffusers SD3 folder, from its configs."
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    mmdit = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(path/"transformer"))
    tes = [CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(path/s)) for s in ("text_encoder", "text_encoder_2")]
    return sd3_components(mmdit, cfg, dict(AutoencoderKL.load_config(path/"vae")),
                          tes + [T5EncoderModel(T5Config.from_pretrained(path/"text_encoder_3"))])


def _header(path, prefix: str) -> dict:
    "Meta tensors with the shapes a checkpoint's header gives, `prefix` removed from the keys that have it."
    from lora_kit.checkpoint import read_shapes
    return {k.removeprefix(prefix): torch.empty(shape, device="meta") for k, shape in read_shapes(path).items()}


def sd3_single_file(path: Path, cfg):
    """SD3 components of a single-file checkpoint: the MMDiT shaped by the file's header; each encoder and the VAE full size
    or tiny, as the file (or its --clip_l/--clip_g/--t5xxl/--vae file) says."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from lora_kit.compat.sd3_formats import SAI_PREFIXES
    from lora_kit.families.sd3 import (CLIP_G, CLIP_L, SD3_VAE, T5XXL, TINY_CLIP_G, TINY_CLIP_L, TINY_T5, TINY_VAE,
                                       _shapes_match, clip_encoder, mmdit_config, t5_encoder)
    def fitting(which: str, build, candidates: list):
        shapes = _header(getattr(cfg, which) or path, SAI_PREFIXES[which])
        return next((m for m in map(build, candidates) if _shapes_match(m, shapes)), build(candidates[0]))
    vocab = _header(cfg.t5xxl or path, SAI_PREFIXES["t5xxl"]).get("shared.weight", torch.empty(32128)).shape[0]
    encoders = [fitting("clip_l", lambda c: clip_encoder(c, "l"), [CLIP_L, TINY_CLIP_L]),
                fitting("clip_g", lambda c: clip_encoder(c, "g"), [CLIP_G, TINY_CLIP_G]),
                fitting("t5xxl", lambda c: t5_encoder(c, vocab), [T5XXL, TINY_T5])]
    conv_in = _header(cfg.vae or path, SAI_PREFIXES["vae"]).get("encoder.conv_in.weight")
    vae = TINY_VAE if conv_in is not None and conv_in.shape[0] == TINY_VAE["block_out_channels"][0] else SD3_VAE
    return sd3_components(SD3Transformer2DModel(**mmdit_config(_header(path, SAI_PREFIXES["mmdit"]))), cfg, vae, encoders)


def sd_model(name: str):
    "SD 1.x/2.x components of a model lora_kit loads (built-in, diffusers folder or single file), from configs."
    from lora_kit.checkpoint import read_shapes
    from lora_kit.families.sd import config_dir_for, detect_model, tiny_components
    kind, what, family = detect_model(name)
    if kind == "builtin": return tiny_components(name)
    if kind == "diffusers": return sd_from_configs(family, Path(what))
    return sd_from_configs(family, config_dir_for(family, read_shapes(what)))


# --- SDXL: lora_kit.families.sdxl's step on the bundled SDXL configs, a mid-size model or a file's / folder's shapes

# a mid-size SDXL-shaped model for `--check` (SDXL's structure, 256 px -> 32x32 latents with the tiny VAE)
SDXL_MID_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
                     attention_head_dim=(2, 4, 8), cross_attention_dim=128 + 256, norm_num_groups=32, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=32, projection_class_embeddings_input_dim=256 + 6 * 32)
SDXL_MID_TE1 = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, projection_dim=128, hidden_act="quick_gelu")
SDXL_MID_TE2 = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256, hidden_act="gelu")


def sdxl_components(unet, vae, te1, te2):
    from lora_kit.compat.sdxl_files import sdxl_tokenizers, training_scheduler
    from lora_kit.families.sdxl import SDXLFamily
    from lora_kit.family import Components
    return Components(SDXLFamily(), unet, vae, [te1, te2], sdxl_tokenizers(), training_scheduler(), source="sdxl")


def sdxl_model(name: str, seed: int = 0):
    "`sdxl` (SDXL 1.0 base, the bundled configs), `sdxl-mid` (`SDXL_MID_*`, seeded), an SDXL file or folder (its configs), on the current device."
    from diffusers import AutoencoderKL
    from lora_kit.compat.sdxl_files import (TE1_CONFIGS, TE2_CONFIGS, UNET_CONFIGS, VAE_CONFIGS, SDXL_CLIP, _te1, _te2, _unet, _vae,
                                            bundled_config, sdxl_file_kind)
    from lora_kit.families.sd import TINY_VAE
    if name == "sdxl": return sdxl_components(*(f(bundled_config(s)) for f, s in ((_unet, "unet"), (_vae, "vae"),
                                                                                   (_te1, "text_encoder"), (_te2, "text_encoder_2"))))
    if name == "sdxl-mid":
        torch.manual_seed(seed)
        return sdxl_components(_unet(SDXL_MID_UNET), AutoencoderKL(**TINY_VAE), _te1(dict(SDXL_CLIP, **SDXL_MID_TE1)), _te2(dict(SDXL_CLIP, **SDXL_MID_TE2)))
    p = Path(name)
    if p.is_dir():
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
        return sdxl_components(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(p/"unet")),
                               AutoencoderKL.from_config(AutoencoderKL.load_config(p/"vae")),
                               CLIPTextModel(CLIPTextConfig.from_pretrained(p/"text_encoder")),
                               CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(p/"text_encoder_2")))
    assert sdxl_file_kind(p) == "base", f"{p} is not an SDXL base checkpoint"
    # a file: the known configuration (full size or tiny) whose UNet width the header has
    from lora_kit.checkpoint import read_shapes
    width = read_shapes(p)["model.diffusion_model.input_blocks.0.0.weight"][0]
    i = next(i for i, c in enumerate(UNET_CONFIGS) if c["block_out_channels"][0] == width)
    return sdxl_components(_unet(UNET_CONFIGS[i]), _vae(VAE_CONFIGS[i]), _te1(TE1_CONFIGS[i]), _te2(TE2_CONFIGS[i]))


def is_sdxl(name: str) -> bool:
    from lora_kit.compat.sdxl_files import is_sdxl_folder, sdxl_file_kind
    if name in ("sdxl", "sdxl-mid"): return True
    p = Path(name)
    if p.is_dir(): return is_sdxl_folder(p)
    return p.is_file() and p.suffix == ".safetensors" and sdxl_file_kind(p) is not None


def bench_model(model: str):
    "The `--check` model: bench/common.py's, `sdxl-mid` or `flux-mid`."
    if model == "flux-mid": return flux_shape_components(model)
    return sdxl_model(model) if model == "sdxl-mid" else bench_components(model)


def components_for(cfg):
    "The models of `cfg`'s `--pretrained_model_name_or_path`, with the family's options, on the current device."
    from lora_kit.families.sd import CONFIGS
    from lora_kit.families.sd3 import TINY_SD3, claims_sd3, tiny_sd3_components
    name = cfg.pretrained_model_name_or_path
    if name == "mid": return bench_components("mid")
    if is_sdxl(name): return sdxl_model(name)
    if is_flux_shape(name): return flux_shape_components(name, cfg)
    if name in SD_SHAPES: return sd_from_configs(SD_SHAPES[name], CONFIGS/SD_SHAPES[name])
    if name in SD3_SHAPES:
        from diffusers import SD3Transformer2DModel
        return sd3_components(SD3Transformer2DModel(**SD3_COMMON, **SD3_SHAPES[name]), cfg)
    if not claims_sd3(name): return sd_model(name)
    if name in TINY_SD3: return tiny_sd3_components(name, cfg=cfg)
    return sd3_folder(Path(name), cfg) if Path(name).is_dir() else sd3_single_file(Path(name), cfg)


# --- Sizes: models, LoRA, optimizer

def tensor_bytes(tensors, dtype: torch.dtype|None = None) -> int:
    "Bytes of `tensors`, floating ones counted in `dtype` (their own if None)."
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()) for t in tensors)


def model_bytes(model, dtype: torch.dtype|None = None) -> int:
    return tensor_bytes([*model.parameters(), *model.buffers()], dtype)


def swapped_blocks(comp, blocks_to_swap: int) -> list:
    """The blocks `--blocks_to_swap N` keeps on the CPU: the last ones of each of the family's block lists, as many as
    `Family.swap_split` says (SD3: the last N joint blocks; FLUX: N//2 double and 2·(N − N//2) single blocks)."""
    split = comp.family.swap_split(comp, blocks_to_swap)
    if not split: raise SystemExit("--blocks_to_swap needs a transformer denoiser (SD3's MMDiT, FLUX's DiT)")
    for blocks, k in split:
        if k > len(blocks) - 2:
            raise SystemExit(f"--blocks_to_swap {blocks_to_swap}: {k} of a list of {len(blocks)} blocks; sd-scripts swaps at most "
                             f"{len(blocks) - 2} of them")
    from lora_kit.runtime.placement import swapped_blocks as swapped
    return swapped(comp, blocks_to_swap)


def swapped_bytes(comp, blocks_to_swap: int) -> int:
    """Bytes `--blocks_to_swap N` keeps off the device: the `swapped_blocks` stay on the CPU and come to the device one
    at a time, so the device holds the other blocks plus `SWAP_LIVE` swapped blocks (the one running and the next,
    prefetched)."""
    if not blocks_to_swap: return 0
    sizes = [model_bytes(b) for b in swapped_blocks(comp, blocks_to_swap)]
    return sum(sizes) - SWAP_LIVE * max(sizes) if len(sizes) > SWAP_LIVE else 0


SWAP_LIVE = 2    # swapped blocks on the device at once (`BlockSwap` prefetches the next while one runs)


STATES = {"lion": 1, "sgdnesterov": 1, "prodigy": 4, "adamw": 2, "pagedadamw": 2, "pagedadamw32bit": 2}   # full-size states


def optimizer_state_bytes(name: str, params: list) -> int:
    "Bytes of the optimizer state sd-scripts' `--optimizer_type` keeps for `params` (others are counted as AdamW)."
    name = (name or "AdamW").lower()
    if name.endswith("8bit"):     # bitsandbytes: 1 byte per state and a float32 absmax per 256 values; float32 below 4096 values
        states = 1 if "lion" in name or "sgd" in name else 2
        return sum(states * (p.numel() + 4 * -(-p.numel() // 256) if p.numel() >= 4096 else 4 * p.numel()) for p in params)
    if name == "adafactor":        # factored second moment (row and column means) of matrices, no first moment by default
        return sum(4 * (p.shape[0] + p[0].numel() if p.dim() >= 2 else p.numel()) for p in params)
    return STATES.get(name, 2) * tensor_bytes(params)


# --- The plan

def autocast_for(cfg) -> Autocast:
    "The CUDA autocast of `--mixed_precision` (none for `no`)."
    return Autocast(weight_dtype(cfg) if cfg.mixed_precision != "no" else None)


def _train_te(cfg) -> bool: return not cfg.network_train_unet_only


def _cached(cfg) -> tuple[bool, bool]:
    "(latents cached, text-encoder outputs cached)."
    return (cfg.cache_latents or cfg.cache_latents_to_disk, cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk)


def prepare(cfg, comp, res):
    """Set the models up as lora_kit's training does (frozen, denoiser and text encoders in the weight dtype or with
    `--fp8_base` in float8, the VAE in float32, attention and gradient checkpointing as the flags say) and inject the
    LoRA; returns the LoRA network."""
    from lora_kit.networks import build_network
    from lora_kit.runtime.placement import store_fp8
    dtype = weight_dtype(cfg)
    for m in [comp.denoiser, comp.vae, *comp.text_encoders]: m.requires_grad_(False).eval()
    for m in [comp.denoiser, *comp.text_encoders]: m.to(dtype=dtype)
    comp.vae.to(dtype=torch.float32)
    store_fp8(cfg, comp)
    from lora_kit.runtime.placement import attention
    comp.family.configure_denoiser(comp, attention(cfg)[0] != "vanilla", cfg.gradient_checkpointing, _train_te(cfg), [res])   # as training chooses it
    for m in [comp.denoiser, *comp.text_encoders]:
        if getattr(m, "is_gradient_checkpointing", False): m.train()
    from lora_kit.runtime.placement import checkpoint_offload
    checkpoint_offload(cfg, comp, comp.denoiser.device, swapped_blocks(comp, cfg.blocks_to_swap) if cfg.blocks_to_swap else ())   # inputs kept on the host
    with torch.device(comp.denoiser.device): network = build_network(cfg, comp)
    return network.to(dtype if cfg.full_bf16 or cfg.full_fp16 else torch.float32).train()


def text_cond(cfg, comp, captions: list[str]) -> dict:
    "The text conditioning of `captions`, as the text encoders give it under autocast."
    with torch.no_grad(), counting(autocast_for(cfg)) as run, run.autocast.region():
        return comp.family.encode_text(comp, captions)


def step_batch(cfg, comp, res) -> dict:
    "A batch as lora_kit's loader gives it: pixels or cached latents, captions or cached text conditioning."
    (w, h), bs, dev = res, cfg.train_batch_size, comp.denoiser.device
    batch = {"captions": ["a photo of sks"] * bs, "rows": (0, bs), "loss_weights": torch.ones(bs, device=dev),
             "original_sizes_hw": torch.tensor([[h, w]] * bs), "crop_top_lefts": torch.zeros(bs, 2, dtype=torch.long),
             "target_sizes_hw": torch.tensor([[h, w]] * bs)}     # SDXL's size conditioning (the data loader's keys)
    latents, texts = _cached(cfg)
    if latents: batch["latents"] = torch.zeros(bs, comp.vae.config.latent_channels, h // 8, w // 8, device=dev)
    else: batch["pixels"] = torch.zeros(bs, 3, h, w, device=dev)
    if texts: batch["text_cond"] = text_cond(cfg, comp, batch["captions"])
    return batch


def step_peak(cfg, comp, network, res, autocast) -> int:
    "Peak bytes of one lora_kit training step (its `batch_loss` and the backward pass) at resolution `res`, with its batch."
    from lora_kit.loss import OBJECTIVES
    from lora_kit.train import TrainState, batch_loss
    objective, batch = OBJECTIVES[comp.family.objective](cfg), step_batch(cfg, comp, res)
    with counting(autocast) as run:
        acc = types.SimpleNamespace(device=comp.denoiser.device, autocast=run.autocast.region)
        loss = batch_loss(TrainState(cfg, comp, accelerator=acc, dtype=weight_dtype(cfg), train_te=_train_te(cfg)), batch, objective)
        run.autocast.enabled = run.autocast.dtype is not None   # checkpointing recomputes under autocast, as torch.utils.checkpoint does
        backward(loss)
    network.zero_grad(set_to_none=True)
    return run.peak + tensor_bytes(t for t in tree_leaves(batch) if isinstance(t, torch.Tensor))


def inference_peaks(cfg, comp, res, sample_res) -> dict:
    """Peak live bytes of encoding images and captions for the caches, and of sampling: one denoiser call on the
    unconditional and conditional batch under autocast (as sd-scripts samples), the VAE decode. The VAE runs in float32
    outside autocast, as in lora_kit."""
    fam, dtype, peaks = comp.family, weight_dtype(cfg), {}
    def measure(what, autocast: bool, fn, *args):
        with torch.no_grad(), counting(autocast_for(cfg)) as run, run.autocast.region() if autocast else contextlib.nullcontext(): fn(*args)
        peaks[what] = run.peak
    (w, h), (sw, sh), ch = res, sample_res, comp.vae.config.latent_channels
    measure("encode images", False, fam.encode_images, comp, torch.empty(cfg.vae_batch_size or 1, 3, h, w, device="meta"))
    measure("encode captions", True, fam.encode_text, comp, ["a photo of sks"] * (cfg.text_encoder_batch_size or cfg.train_batch_size))
    cond = {k: v.to(dtype) for k, v in text_cond(cfg, comp, ["a photo of sks", ""]).items()}
    measure("sample: denoise", True, fam.predict, comp, torch.empty(2, ch, sh // 8, sw // 8, device="meta", dtype=dtype),
            torch.full((2,), 500, device="meta"), cond)
    measure("sample: decode", False, comp.vae.decode, torch.empty(1, ch, sh // 8, sw // 8, device="meta"))
    return peaks


def sample_resolution(cfg, res) -> tuple[int, int]:
    "The largest image of `--sample_prompts` (its --w/--h; the training resolution by default)."
    from lora_kit.sample import read_prompts
    if not (cfg.sample_prompts and Path(cfg.sample_prompts).is_file()): return res
    return max(((p.width, p.height) for p in read_prompts(cfg.sample_prompts, *res)), key=lambda s: s[0] * s[1], default=res)


@dataclass
class Plan:
    "Sizes in bytes and what each phase needs on the device."
    cfg: object
    models: dict            # name -> (params, dtype on the device, bytes)
    lora: tuple             # (modules, params, dtype, bytes)
    optimizer: int          # optimizer state bytes
    swapped: int            # denoiser bytes --blocks_to_swap keeps off the device
    peaks: dict             # what runs -> peak live bytes
    notes: list = field(default_factory=list)
    cache_only: tuple = ()  # text encoders a partial cache replaces (`Family.cache_only_encoders`)


def main_dtype(model) -> torch.dtype:
    "The dtype most of `model`'s parameters have (with `--fp8_base`: float8, though the first layer and the norms are not)."
    counts = collections.Counter()
    for p in model.parameters(): counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0]


def make_plan(cfg) -> Plan:
    "Build `cfg`'s models and LoRA on meta as lora_kit's training prepares them, and measure every phase."
    from lora_kit.config import option_notes, parse_resolution
    with torch.device("meta"): comp = components_for(cfg)
    res = parse_resolution(cfg.resolution) if cfg.resolution else (comp.family.default_resolution,) * 2
    network = prepare(cfg, comp, res)
    params = [p for p in network.parameters() if p.requires_grad]
    names = {"denoiser": comp.denoiser, "vae": comp.vae, **{f"text encoder {i + 1}": te for i, te in enumerate(comp.text_encoders)}}
    models = {n: (sum(p.numel() for p in m.parameters()), main_dtype(m), model_bytes(m)) for n, m in names.items()}
    peaks = {"train step": step_peak(cfg, comp, network, res, autocast_for(cfg)),
             **inference_peaks(cfg, comp, res, sample_resolution(cfg, res))}
    opt = (cfg.optimizer_type or "AdamW").lower()
    modelled = opt in STATES or opt.endswith("8bit") or opt == "adafactor"
    notes = (option_notes(cfg) + ["--xformers is counted as --sdpa (both fused attention)"] * bool(cfg.xformers)
             + [f"--optimizer_type {cfg.optimizer_type}: its state is counted as AdamW's"] * (not modelled))
    return Plan(cfg, models, (len(network.loras), sum(p.numel() for p in params), params[0].dtype, tensor_bytes(params)),
                optimizer_state_bytes(cfg.optimizer_type, params), swapped_bytes(comp, cfg.blocks_to_swap),
                peaks, notes, comp.family.cache_only_encoders)


# --- Phases: which weights are on the device, and what runs

def _encoders(plan) -> list[str]: return [n for n in plan.models if n.startswith("text encoder")]


def step_encoders(plan) -> list[str]:
    "Text encoders the training step runs: all without a text cache; with one, those that train (SD3: CLIP-L/G over cached T5)."
    cfg, tes = plan.cfg, _encoders(plan)
    if not _cached(cfg)[1]: return tes
    return [t for i, t in enumerate(tes) if i not in plan.cache_only] if _train_te(cfg) else []


TRAINING, SAMPLING = ("LoRA", "optimizer state", "train step"), ("LoRA", "optimizer state", "sample step")


def moments(plan, how: str) -> dict[str, list[tuple[list[str], tuple]]]:
    """Phase -> its moments, each (models on the device, what else is there). `device`: lora_kit's placement on a GPU
    (`runtime.placement.Placement`, sd-scripts' order): models load to the CPU; the VAE, then the text encoders come to the device to
    fill their caches and go back; the steps hold the denoiser and what each step runs (`runtime.placement.training_models`); sampling
    adds the VAE, and no text encoder that does not train (the sample prompts are encoded once); block swap as asked.
    `cpu`: what a CPU run holds in host memory: every model loaded, less those freed once cached (`--check` measures it)."""
    cfg, tes = plan.cfg, _encoders(plan)
    latents, texts = _cached(cfg)
    if how == "cpu":
        keep_vae = bool(cfg.sample_prompts)
        freed = ({"vae"} if latents and not keep_vae else set()) | (set(tes) - set(step_encoders(plan)) if texts else set())
        train = [n for n in plan.models if n not in freed]
        after_latents = [n for n in plan.models if not (latents and not keep_vae and n == "vae")]
        caching = [(list(plan.models), ("encode images",))] * latents + [(after_latents, ("encode captions",))] * texts
        return {"loading": [(list(plan.models), ())], "caching": caching, "training": [(train, TRAINING)],
                "sampling": [(train, SAMPLING)] * bool(cfg.sample_prompts)}
    train = ["denoiser", *(["vae"] * (not latents)), *step_encoders(plan)]
    sample = list(dict.fromkeys(train + ["vae"]))
    return {"loading": [([], ())], "caching": [(["vae"], ("encode images",))] * latents + [(tes, ("encode captions",))] * texts,
            "training": [(train, TRAINING)], "sampling": [(sample, SAMPLING)] * bool(cfg.sample_prompts)}


def part_bytes(plan, what: str, how: str) -> int:
    "Bytes of a model on the device or of something else a phase holds."
    swaps = how == "device"
    if what in plan.models: return plan.models[what][2] - (plan.swapped if what == "denoiser" and swaps else 0)
    if what == "LoRA": return plan.lora[3] * (2 if plan.cfg.gradient_accumulation_steps > 1 else 1)   # + gradients kept between steps
    if what == "optimizer state": return plan.optimizer
    if what == "sample step": return max(plan.peaks["sample: denoise"], plan.peaks["sample: decode"])
    return plan.peaks[what]


def phase_bytes(plan, how: str) -> dict[str, tuple[int, list]]:
    "Phase -> (peak bytes, [(part, bytes)] of its fullest moment), for a placement; phases that do not happen are left out."
    out = {}
    for phase, ms in moments(plan, how).items():
        parts = [[(w, part_bytes(plan, w, how)) for w in [*names, *extra]] for names, extra in ms]
        if parts: out[phase] = max(((sum(b for _, b in p), p) for p in parts), key=lambda x: x[0])
    return out


# --- Printing

def report(plan) -> str:
    "The plan as text: models and LoRA, what runs on the device, and each phase on a GPU (and in host memory on a CPU)."
    cfg = plan.cfg
    placements = {how: phase_bytes(plan, how) for how in ("device", "cpu")}
    peak = {how: max(total for total, _ in phases.values()) for how, phases in placements.items()}
    unit, div = ("GiB", GiB) if max(peak.values()) >= GiB else ("MiB", MiB)
    size = lambda b: f"{b / div:,.2f}"
    dtype = lambda d: str(d).removeprefix("torch.")
    lines = [f"{cfg.pretrained_model_name_or_path}: {cfg.resolution or 'default'} px, batch {cfg.train_batch_size}, --mixed_precision "
             f"{cfg.mixed_precision}" + " --full_bf16" * bool(cfg.full_bf16) + " --full_fp16" * bool(cfg.full_fp16),
             f"\n{'model':<16}{'params':>15}  {'dtype on device':<16}{unit:>9}"]
    lines += [f"{n:<16}{count:>15,}  {dtype(d):<16}{size(b):>9}" for n, (count, d, b) in plan.models.items()]
    mods, count, d, b = plan.lora
    lines.append(f"{'LoRA':<16}{count:>15,}  {dtype(d):<16}{size(b):>9}   {mods} modules, dim {cfg.network_dim or 4}; gradients "
                 f"{size(b)}, {cfg.optimizer_type or 'AdamW'} state {size(plan.optimizer)} {unit}")
    lines.append(f"\nrun on the device: peak of its live tensors {unit:>11}")
    lines += [f"  {what:<40}{size(b):>9}" for what, b in plan.peaks.items()]
    lines.append(f"\n{'phase':<10}{'on a GPU':>22}{'CPU run (host)':>16}   {unit}; what the GPU holds")
    for phase in ("loading", "caching", "training", "sampling"):
        a, b = (placements[how].get(phase) for how in placements)
        detail = ", ".join(f"{n} {size(x)}" for n, x in a[1]) if a else ""
        lines.append(f"{phase:<10}{size(a[0]) if a else '-':>22}{size(b[0]) if b else '-':>16}   {detail}")
    lines.append(f"{'peak':<10}{size(peak['device']):>22}{size(peak['cpu']):>16}   + CUDA context (~0.3-0.5 GiB), "
                 "allocator fragmentation, cuDNN/cuBLAS workspaces")
    lines.append("on a GPU: models load to the CPU and come to the device only while they are needed (sd-scripts' order); "
                 "on a CPU every model stays in host memory unless freed once its outputs are cached")
    if plan.swapped: lines.append(f"note: --blocks_to_swap {cfg.blocks_to_swap} keeps {size(plan.swapped)} {unit} of the MMDiT on the CPU")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


# --- Full-size estimates for bench/README.md

def gib(b: int) -> str: return f"{b / GiB:.2f}"


README_COMMON = ["--network_dim", "16", "--network_alpha", "16", "--network_train_unet_only", "--optimizer_type", "AdamW8bit",
                 "--train_batch_size", "1", "--cache_latents", "--sample_prompts", "prompts.txt"]   # samples at the training size
SD15 = ["sd15", "--network_module", "networks.lora", "--resolution", "512", "--mixed_precision", "fp16"]
SD3 = ["--network_module", "networks.lora_sd3", "--resolution", "1024", "--mixed_precision", "bf16", "--cache_text_encoder_outputs",
       "--gradient_checkpointing"]
SDXL = ["sdxl", "--network_module", "networks.lora", "--resolution", "1024", "--mixed_precision", "bf16", "--sdpa",
        "--cache_text_encoder_outputs", "--gradient_checkpointing"]     # docs/train_SDXL-en.md's 8 GB recipe (dim 16 here)
VANILLA = ["--attention", "vanilla"]   # sd-scripts' default attention: the check measures it (its activations are what the plan models most)


README_RUNS = {
    "SD1.5 512 px fp16, `--sdpa --gradient_checkpointing`": [*SD15, "--sdpa", "--gradient_checkpointing"],
    "SD1.5 512 px fp16, `--sdpa`": [*SD15, "--sdpa"],
    "SD1.5 512 px fp16, `--gradient_checkpointing` (vanilla attention)": [*SD15, "--gradient_checkpointing", *VANILLA],
    "SD1.5 512 px fp16 (vanilla attention)": [*SD15, *VANILLA],
    "SD3.5 Medium 1024 px bf16": ["sd35-medium", *SD3],
    "SDXL 1024 px bf16, `--gradient_checkpointing`": SDXL,
    "SDXL 1024 px bf16, `--gradient_checkpointing --fp8_base`": [*SDXL, "--fp8_base"],
    **{f"SD3.5 Large 1024 px bf16, `--blocks_to_swap {n}`": ["sd35-large", *SD3, *(["--blocks_to_swap", str(n)] if n else [])]
       for n in (0, 12, 18, 24)},
    "SD3.5 Medium 1024 px bf16, `--fp8_base`": ["sd35-medium", *SD3, "--fp8_base"],
    **{f"SD3.5 Large 1024 px bf16, `--fp8_base`{f' `--blocks_to_swap {n}`' if n else ''}": ["sd35-large", *SD3, "--fp8_base",
       *(["--blocks_to_swap", str(n)] if n else [])] for n in (0, 8)},
}


def readme_table():
    "The full-size estimates as a markdown table (GiB on a GPU, lora_kit's placement)."
    from lora_kit.config import make_config
    print("| run | train step | caching | training | sampling | **peak** |")
    print("|---|---|---|---|---|---|")
    for title, (model, *flags) in README_RUNS.items():
        plan = make_plan(make_config(["--pretrained_model_name_or_path", model, *README_COMMON, *flags], check=False))
        ph = phase_bytes(plan, "device")
        cell = lambda p: gib(ph[p][0]) if p in ph else "-"
        print(f"| {title} | {gib(plan.peaks['train step'])} | {cell('caching')} | {cell('training')} | {cell('sampling')} | "
              f"**{gib(max(t for t, _ in ph.values()))}** |", flush=True)


# --- The estimate against a real CPU run

CHECK_RUNS = [("tiny", 256, VANILLA), ("mid", 256, VANILLA), ("mid", 256, [*VANILLA, "--gradient_checkpointing"])]   # (bench model, px, flags)
SDXL_CHECK_RUNS = [("sdxl-mid", 256, []), ("sdxl-mid", 256, ["--gradient_checkpointing"])]         # `--check sdxl`


def check_argv(model: str, res: int, data: Path, out: Path, extra: list[str], precision: str = "no") -> list[str]:
    """The CPU training run `--check` measures: a bench model (tiny, mid), batch 2, UNet-only LoRA dim 8, AdamW, 2 steps
    (the second holds the optimizer state as well as its activations)."""
    return ["--pretrained_model_name_or_path", {"tiny": "tiny-sd1"}.get(model, model), "--train_data_dir", str(data),
            "--caption_extension", ".txt", "--resolution", str(res), "--train_batch_size", "2", "--network_module", "networks.lora",
            "--network_dim", "8", "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
            "--mixed_precision", precision, "--max_train_steps", "2", "--seed", "0", "--max_data_loader_n_workers", "0",
            "--output_dir", str(out), *extra]


def train_bench_model(model: str, res: int, extra: list[str], tmp: Path) -> float:
    "Train a bench model as `check_argv` says; the RSS increase (MiB) from before its models are built to the highest step."
    from lora_kit.config import make_config
    from lora_kit.train import Callback, train
    argv = check_argv(model, res, write_dataset(tmp/f"data_{res}", n=4, res=res), tmp/"out", extra)
    cfg = make_config([{"mid": "tiny-sd1", "sdxl-mid": "tiny-sd1", "flux-mid": "tiny-flux"}.get(a, a) for a in argv])   # the bench model itself is passed in as `comp`
    class StepPeaks(Callback):
        uses_models = False
        def __init__(self): self.peaks = []
        def on_step_end(self, state): self.peaks.append(peak_rss_mb())
    gc.collect()
    reset_peak_rss()
    before, steps = rss_mb(os.getpid()), StepPeaks()
    train(cfg, [steps], comp=bench_model(model), progress=False)
    return max(steps.peaks) - before


def measure_worker(runs: list):
    """In a fresh process: train the tiny model once so that the code of a training step is paged in, then each run of
    `runs`; print the RSS increase of each."""
    with tempfile.TemporaryDirectory(prefix="lk_vram_") as tmp:
        train_bench_model("tiny", 64, [], Path(tmp))
        print("RESULT " + json.dumps([train_bench_model(*run, Path(tmp)) for run in runs]), flush=True)


def start_measuring(runs: list) -> subprocess.Popen:
    """Start `measure_worker` for `runs` in a subprocess (1 thread). glibc's malloc is told to serve blocks of 64 KiB and
    more with mmap (`MALLOC_MMAP_THRESHOLD_`), so a freed tensor leaves RSS at once and RSS follows the live tensors, as
    a GPU allocator's allocated bytes do; glibc's default threshold grows up to 32 MiB and RSS then also holds freed heap
    memory (~20 % more on the mid model)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
    return subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(runs)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def measured_increases(proc: subprocess.Popen) -> list[float]:
    "The RSS increases (MiB) a `start_measuring` process printed."
    out, err = proc.communicate()
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines: raise RuntimeError(f"the measuring process failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def training_parts(model: str, res: int, extra: list[str]) -> dict[str, float]:
    "What the plan puts in the training phase of a `--check` run (MiB), in lora_kit's placement (on a CPU every model stays)."
    from lora_kit.config import make_config
    plan = make_plan(make_config(check_argv(model, res, Path("data"), Path("out"), extra), check=False))
    return {part: b / MiB for part, b in phase_bytes(plan, "cpu")["training"][1]}


def autocast_peaks(model: str, res: int, extra: list[str]) -> tuple[int, int]:
    """Peak live bytes of one bf16 mixed-precision training step of a bench model on the CPU, (under PyTorch's CPU autocast,
    under `Autocast` given the CPU's op lists): the emulation the plan runs with CUDA's lists, checked against the real one."""
    from lora_kit.config import make_config
    cfg = make_config(check_argv(model, res, Path("data"), Path("out"), extra, "bf16"), check=False)
    comp = bench_model(model)
    network = prepare(cfg, comp, (res, res))
    return (step_peak(cfg, comp, network, (res, res), CPUAutocast(torch.bfloat16)),
            step_peak(cfg, comp, network, (res, res), Autocast(torch.bfloat16, CPU_FLOAT_OPS)))


def check(runs=CHECK_RUNS):
    "Print the plan's training memory against the RSS increase of the real run, and the autocast emulation against autocast."
    proc = start_measuring(runs)          # measures while the plans are made
    planned = [sum(training_parts(*run).values()) for run in runs]
    for (model, res, extra), p, m in zip(runs, planned, measured_increases(proc)):
        print(f"{model} {res} px {' '.join(extra) or '(no levers)'}, fp32: planned {p:,.0f} MiB, measured RSS increase {m:,.0f} MiB, "
              f"planned/measured {p / m:.2f}", flush=True)
    for model, res, extra in runs:
        real, emulated = autocast_peaks(model, res, extra)
        print(f"{model} {res} px {' '.join(extra) or '(no levers)'}, bf16 step on the CPU: torch.autocast {real / MiB:,.1f} MiB, "
              f"emulated {emulated / MiB:,.1f} MiB, ratio {emulated / real:.3f}", flush=True)


def main(argv=None):
    import warnings
    from diffusers.utils import logging as diffusers_logging
    warnings.filterwarnings("ignore", category=FutureWarning)
    diffusers_logging.set_verbosity_error()       # casting a model that has no float32-only modules is no news
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if argv[:1] == ["--worker"]: return measure_worker(json.loads(argv[1]))
    if argv[:1] == ["--readme"]: return readme_table()
    if argv[:1] == ["--check"]: return check({"sdxl": SDXL_CHECK_RUNS, "flux": FLUX_CHECK_RUNS}.get(argv[1] if argv[1:] else "", CHECK_RUNS))
    if argv[:1] == ["--tiers"]: return tier_table(*argv[2:3])
    if not argv or argv[0] in ("-h", "--help"): print(__doc__); return
    from lora_kit.config import make_config
    print(report(make_plan(make_config(argv, check=False))))


if __name__ == "__main__":
    main()

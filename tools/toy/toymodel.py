"""Configs of the toy SD1 model: the same diffusers/transformers classes a real SD 1.5 folder uses, scaled down.

| part          | class (as in an SD 1.5 folder)        | toy size                                              |
|---------------|---------------------------------------|-------------------------------------------------------|
| vae           | diffusers.AutoencoderKL               | 3 blocks (16, 32, 64) -> factor 4, 4 latent channels: 64 px -> 16x16 latents |
| text_encoder  | transformers.CLIPTextModel            | hidden 64, 2 layers, 2 heads, real vocab 49408, 77 positions |
| tokenizer     | transformers.CLIPTokenizer            | the real CLIP BPE files (lora_kit.config.ASSETS / clip_tokenizer) |
| unet          | diffusers.UNet2DConditionModel        | (32, 64, 64), 1 layer/block, attention at 8x8/4x4/mid, cross-attn dim 64, sample_size 16 |
| scheduler     | diffusers.PNDMScheduler (SD 1.5 config = lora_kit.families.sd.SCHEDULER: scaled_linear 0.00085..0.012, 1000 steps, epsilon) |

Public API: vae_config(), text_config(), unet_config(), scheduler_config(), build_vae(), build_text_encoder(),
build_unet(), load_tokenizer(), TOKENIZER_DIR.
"""
from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lora_kit.config import ASSETS
from lora_kit.families.sd import SCHEDULER

TOKENIZER_DIR = ASSETS / "clip_tokenizer"  # the package's bundled CLIP vocabulary
LATENT_SIZE = 16  # 64 px / VAE factor 4


def vae_config() -> dict:
    "AutoencoderKL kwargs: 3 blocks = factor 2**(3-1) = 4; no mid-block attention (the VAE is trained on crops)."
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=64, mid_block_add_attention=False)


def text_config() -> dict:
    """CLIPTextConfig kwargs: real CLIP vocabulary and 77 positions, tiny width/depth.

    Token ids bos/eos/pad follow SD 1.5's text_encoder/config.json (0/2/1: legacy values; transformers then pools at
    argmax(input_ids), i.e. at <|endoftext|> 49407, which SD does not use anyway)."""
    return dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)


def unet_config() -> dict:
    """UNet2DConditionModel kwargs: 3 levels (16x16, 8x8, 4x4 latents) + mid block, scaled down from SD 1.5.

    Unlike SD 1.5, the full-resolution level has no transformer: on one CPU thread self-attention over 256 tokens
    cost half of each training step, so attention (self + cross) lives at 8x8 and 4x4 and in the mid block."""
    return dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=64, attention_head_dim=2, norm_num_groups=16)


def scheduler_config() -> dict:
    """The noise schedule of SD 1.5 (scheduler/scheduler_config.json), used for training (DDPM) and sampling (PNDM):
    the package's SD schedule (`families.sd.SCHEDULER`) with epsilon prediction and SD 1.5's PNDM settings."""
    return dict(SCHEDULER, prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**vae_config())


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**text_config()))


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**unet_config())


def load_tokenizer() -> CLIPTokenizer:
    "Real CLIP tokenizer from the bundled files, with SD's max length 77."
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)

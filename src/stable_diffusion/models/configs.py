"""Dataclass configs for the three networks and the model families, with presets by name.

Field names follow the LDM/SGM yaml configs (``model_channels``, ``channel_mult``, ``attention_resolutions``...)
so an LDM config reads across one to one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class UNetConfig:
    """LDM ``UNetModel`` options (openaimodel.py / SGM)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    num_heads: int = 8  # used when num_head_channels == -1
    num_head_channels: int = -1
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # per level
    transformer_depth_middle: int = 1
    context_dim: int | None = 768  # None: attn2 is self-attention (no text conditioning)
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None  # SDXL "sequential" label_emb input size (2816)
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if isinstance(self.transformer_depth, int):
            self.transformer_depth = (self.transformer_depth,) * len(self.channel_mult)
        self.transformer_depth = tuple(self.transformer_depth)
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("transformer_depth needs one entry per channel_mult level")
        # canonical form: a level has attention iff its factor is listed and its depth is > 0
        levels = range(len(self.channel_mult))
        self.transformer_depth = tuple(d if 2**lv in self.attention_resolutions else 0
                                       for lv, d in zip(levels, self.transformer_depth))
        self.attention_resolutions = tuple(2**lv for lv in levels if self.transformer_depth[lv])

    def depth_at(self, level: int) -> int:
        """Transformer blocks at a level (0 = no attention there)."""
        return self.transformer_depth[level]

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) for a block of ``channels`` width, as LDM computes them."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass
class VAEConfig:
    """LDM ``AutoencoderKL`` (ddconfig + embed_dim); attention only in the middle block, as in SD."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    dropout: float = 0.0
    scaling_factor: float = 0.18215
    norm_groups: int = 32  # GroupNorm groups (LDM: 32); fewer suits narrow VAEs, whose 32 groups are 1 channel

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)


@dataclass
class TextEncoderConfig:
    """A CLIP text transformer (OpenAI CLIP or OpenCLIP; same maths, different checkpoint names)."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    activation: str = "quick_gelu"  # quick_gelu (OpenAI CLIP) | gelu (OpenCLIP)
    projection_dim: int | None = None  # text_projection for the pooled output (SDXL bigG)
    output_layer: int = -1  # hidden state used as context: -1 last, -2 penultimate
    final_norm: bool = True  # apply final_layer_norm to that hidden state
    layout: str = "openai"  # checkpoint naming: openai (HF CLIPTextModel) | openclip
    pad_token_id: int = 49407
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@dataclass
class ModelConfig:
    """A whole Stable Diffusion model: family, networks, and the diffusion it was trained with."""

    family: str  # sd1 | sd2 | sdxl | sdxl-refiner | custom
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: list[TextEncoderConfig]
    prediction: str = "eps"  # eps | v
    image_size: int = 512  # native size in pixels
    size_embed_dim: int = 0  # SDXL: width of each size/crop embedding (256); 0 = no size conditioning
    timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    name: str = ""

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def is_refiner(self) -> bool:
        """SDXL's refiner: OpenCLIP-G only, and y carries an aesthetic score where the base has the target size."""
        return self.family == "sdxl-refiner"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        data["unet"] = _build(UNetConfig, data["unet"])
        data["vae"] = _build(VAEConfig, data["vae"])
        data["text_encoders"] = [_build(TextEncoderConfig, t) for t in data["text_encoders"]]
        return _build(cls, data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _build(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)


# --- presets ---------------------------------------------------------------------------------------------

CLIP_L = TextEncoderConfig()  # SD1 / SDXL first encoder: OpenAI CLIP ViT-L/14 text
OPENCLIP_H = TextEncoderConfig(
    width=1024, layers=24, heads=16, intermediate=4096, activation="gelu", output_layer=-2,
    layout="openclip", pad_token_id=0,
)
OPENCLIP_BIGG = TextEncoderConfig(
    width=1280, layers=32, heads=20, intermediate=5120, activation="gelu", output_layer=-2, final_norm=False,
    layout="openclip", pad_token_id=0, projection_dim=1280,
)


def _sd1(in_channels: int = 4) -> ModelConfig:
    return ModelConfig(family="sd1", unet=UNetConfig(in_channels=in_channels), vae=VAEConfig(),
                       text_encoders=[CLIP_L])


def _sd2(in_channels: int = 4, prediction: str = "eps", image_size: int = 512) -> ModelConfig:
    unet = UNetConfig(in_channels=in_channels, num_head_channels=64, num_heads=-1, context_dim=1024,
                      use_linear_in_transformer=True)
    return ModelConfig(family="sd2", unet=unet, vae=VAEConfig(), text_encoders=[OPENCLIP_H],
                       prediction=prediction, image_size=image_size)


def _sdxl(in_channels: int = 4) -> ModelConfig:
    unet = UNetConfig(
        in_channels=in_channels, model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2),
        num_head_channels=64, num_heads=-1, transformer_depth=(0, 2, 10), transformer_depth_middle=10,
        context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
    )
    clip_l = dataclasses.replace(CLIP_L, output_layer=-2, final_norm=False)
    return ModelConfig(family="sdxl", unet=unet, vae=VAEConfig(scaling_factor=0.13025),
                       text_encoders=[clip_l, OPENCLIP_BIGG], image_size=1024, size_embed_dim=256)


def _sdxl_refiner() -> ModelConfig:
    """SDXL's refiner (sd_xl_refiner_1.0): a 384-channel UNet with attention on its two middle levels, OpenCLIP-G's
    penultimate layer as context, y = pooled text + (height, width, crop top, crop left, aesthetic score)."""
    unet = UNetConfig(
        model_channels=384, channel_mult=(1, 2, 4, 4), attention_resolutions=(2, 4), num_head_channels=64,
        num_heads=-1, transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4, context_dim=1280,
        use_linear_in_transformer=True, adm_in_channels=1280 + 5 * 256,
    )
    return ModelConfig(family="sdxl-refiner", unet=unet, vae=VAEConfig(scaling_factor=0.13025),
                       text_encoders=[OPENCLIP_BIGG], image_size=1024, size_embed_dim=256)


# Tiny configs keep each family's block structure (levels with/without attention, linear proj, heads
# by channels, SDXL depths and size conditioning) at a size that runs in milliseconds.
_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
_TINY_CLIP = TextEncoderConfig(width=32, layers=3, heads=2, intermediate=37)


def _tiny_sd1(in_channels: int = 4) -> ModelConfig:
    unet = UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                      attention_resolutions=(1,), num_heads=2, transformer_depth=(1, 1), context_dim=32)
    return ModelConfig(family="sd1", unet=unet, vae=_TINY_VAE, text_encoders=[_TINY_CLIP], image_size=64)


def _tiny_sd2(in_channels: int = 4, prediction: str = "eps") -> ModelConfig:
    unet = UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                      attention_resolutions=(1,), num_heads=-1, num_head_channels=16, transformer_depth=(1, 1),
                      context_dim=32, use_linear_in_transformer=True)
    text = dataclasses.replace(_TINY_CLIP, activation="gelu", output_layer=-2, layout="openclip", pad_token_id=0)
    return ModelConfig(family="sd2", unet=unet, vae=_TINY_VAE, text_encoders=[text], image_size=64,
                       prediction=prediction)


def _tiny_sdxl(in_channels: int = 4) -> ModelConfig:
    size_dim = 8
    clip_l = dataclasses.replace(_TINY_CLIP, output_layer=-2, final_norm=False)
    clip_g = dataclasses.replace(_TINY_CLIP, width=32, activation="gelu", output_layer=-2, final_norm=False,
                                 layout="openclip", pad_token_id=0, projection_dim=32)
    unet = UNetConfig(
        in_channels=in_channels, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
        attention_resolutions=(2,), num_heads=-1, num_head_channels=16, transformer_depth=(0, 2),
        transformer_depth_middle=2, context_dim=64, use_linear_in_transformer=True,
        adm_in_channels=32 + 6 * size_dim,
    )
    return ModelConfig(family="sdxl", unet=unet, vae=dataclasses.replace(_TINY_VAE, scaling_factor=0.13025),
                       text_encoders=[clip_l, clip_g], image_size=64, size_embed_dim=size_dim)


def _tiny_sdxl_refiner() -> ModelConfig:
    base = _tiny_sdxl()
    clip_g = base.text_encoders[1]
    unet = dataclasses.replace(base.unet, context_dim=clip_g.width, adm_in_channels=clip_g.projection_dim + 5 * 8)
    return base.replace(family="sdxl-refiner", unet=unet, text_encoders=[clip_g])


PRESETS = {
    "sd1": _sd1,
    "sd1-inpaint": lambda: _sd1(9),
    "sd2": _sd2,
    "sd2-v": lambda: _sd2(prediction="v", image_size=768),
    "sd2-inpaint": lambda: _sd2(9),
    "sdxl": _sdxl,
    "sdxl-inpaint": lambda: _sdxl(9),
    "sdxl-refiner": _sdxl_refiner,
    "tiny-sd1": _tiny_sd1,
    "tiny-sd1-inpaint": lambda: _tiny_sd1(9),
    "tiny-sd2": _tiny_sd2,
    "tiny-sd2-v": lambda: _tiny_sd2(prediction="v"),
    "tiny-sd2-inpaint": lambda: _tiny_sd2(9),
    "tiny-sdxl": _tiny_sdxl,
    "tiny-sdxl-inpaint": lambda: _tiny_sdxl(9),
    "tiny-sdxl-refiner": _tiny_sdxl_refiner,
}


def preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a preset name (see ``PRESETS``)."""
    try:
        config = PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return config.replace(name=name)


__all__ = ["UNetConfig", "VAEConfig", "TextEncoderConfig", "ModelConfig", "PRESETS", "preset", "field"]

"""CLIP score (Hessel et al. 2021): ``100 * max(cos(image, text), 0)`` averaged over pairs, with any CLIP
checkpoint in transformers' folder layout (config.json + model.safetensors + tokenizer files), read by our own
towers. The project's domain CLIP, trained on the shapes data (``sd train configs/domain_clip.toml``), is
stored in the same layout, so the same code scores the built-in model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..checkpoints.io import read_state_dict, write_json, write_safetensors
from ..images import to_unit
from ..models.clip_vision import CLIPPair, VisionConfig
from ..models.configs import TextEncoderConfig
from ..models.tokenizer import CLIPTokenizer


class CLIPScorer:
    def __init__(self, model: CLIPPair, tokenizer: CLIPTokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPScorer:
        folder = Path(path)
        try:
            config = json.loads((folder / "config.json").read_text())
            t, v = config["text_config"], config["vision_config"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{folder} is not a CLIP model folder (config.json with text_config and "
                             f"vision_config): {error}") from None
        text = TextEncoderConfig(vocab_size=t.get("vocab_size", 49408), max_positions=t.get("max_position_embeddings", 77),
                                 width=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                                 intermediate=t["intermediate_size"], activation=t.get("hidden_act", "quick_gelu"),
                                 eos_token_id=t.get("eos_token_id", 49407))
        vision = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                              layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                              intermediate=v["intermediate_size"], activation=v.get("hidden_act", "quick_gelu"))
        model = CLIPPair(text, vision, config.get("projection_dim", 512))
        model.load_state_dict_hf(read_state_dict(folder / "model.safetensors")[0])
        has_vocab = (folder / "vocab.json").exists() or (folder / "tokenizer.json").exists()
        return cls(model, CLIPTokenizer.from_folder(folder) if has_vocab else CLIPTokenizer.builtin())

    def save(self, path: str | Path, tokenizer_files: bool = True) -> None:
        """transformers' CLIPModel layout, so their CLIPModel / torchmetrics can read it too (without the
        tokenizer files, we read it with the standard CLIP vocabulary)."""
        folder = Path(path)
        m = self.model
        t, v = m.text_config, m.vision_config
        config = {
            "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": m.projection_dim,
            "logit_scale_init_value": 2.6592,
            "text_config": {"vocab_size": t.vocab_size, "max_position_embeddings": t.max_positions,
                            "hidden_size": t.width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                            "intermediate_size": t.intermediate, "hidden_act": t.activation,
                            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
                            "pad_token_id": t.pad_token_id, "projection_dim": m.projection_dim},
            "vision_config": {"image_size": v.image_size, "patch_size": v.patch_size, "hidden_size": v.width,
                              "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                              "intermediate_size": v.intermediate, "hidden_act": v.activation,
                              "projection_dim": m.projection_dim},
        }
        write_json(folder / "config.json", config)
        write_safetensors(folder / "model.safetensors", {k: v.half() if v.is_floating_point() else v
                                                         for k, v in m.state_dict_hf().items()})
        if tokenizer_files:
            self.tokenizer.save(folder)

    @torch.no_grad()
    def scores(self, images: list[Image.Image] | torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Per-pair scores ``100 * max(cos, 0)``; images as PIL or (B, 3, H, W) in [0, 1]."""
        pixels = to_unit(images) if isinstance(images, list) else images
        param = next(self.model.parameters())
        image_emb = self.model.embed_images(pixels.to(param.device, param.dtype))
        text_emb = self.model.embed_texts(self.tokenizer(texts).to(param.device))
        return 100 * (image_emb * text_emb).sum(-1).clamp(min=0).float()

    def score(self, images: list[Image.Image] | torch.Tensor, texts: list[str]) -> float:
        return float(self.scores(images, texts).mean())

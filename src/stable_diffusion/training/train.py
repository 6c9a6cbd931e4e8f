"""``sd train CONFIG.toml``: the stages of a config in order (VAE, then UNet + text encoder, or a LoRA on an
existing model), written to ``[train] save_path``: ``model.safetensors`` (a single-file checkpoint that
``load_pipeline`` and ``sd txt2img --model`` read like any other), ``loss.jsonl``, ``loss.png``,
``samples/``, and one resumable ``<stage>-state.pt`` per stage."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from ..checkpoints.io import write_safetensors
from ..diffusion.schedules import model_alphas_cumprod
from ..lora import add_lora, lora_state_dict, remove_lora
from ..models.unet import set_gradient_checkpointing
from ..pipeline import DTYPES, Pipeline, load_pipeline
from .config import TrainConfig
from .data import FolderDataset, control_folder, make_batch
from .loop import Dist, LossLog, StageRunner, StageSpec, init_distributed
from .objectives import (
    ContrastiveLoss,
    ControlNetLoss,
    DiffusionLoss,
    HintedUNet,
    VAELoss,
    caption_loss_weights,
    step_generator,
)
from .plots import loss_curve, sample_grid


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.config, self.resume, self.progress = config, resume, progress
        t = config.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = pick_device(t.device)
        self.dist: Dist = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.out = Path(t.save_path)
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume and self.dist.main:
            for stale in [*self.out.glob("*-state.pt"), self.out / "loss.jsonl"]:
                stale.unlink(missing_ok=True)
        self.log = LossLog(self.out / "loss.jsonl")
        if t.base_model:
            self.pipe = load_pipeline(t.base_model, device=self.device, dtype=torch.float32)
        else:
            self.pipe = Pipeline.from_config(config.new_model_config(), seed=t.seed).to(self.device)
            if config.vae.checkpoint:
                donor = load_pipeline(config.vae.checkpoint, dtype=torch.float32)
                self.pipe.vae.load_state_dict(donor.vae.state_dict())
                self.pipe.config.vae.scaling_factor = donor.config.vae.scaling_factor
        set_gradient_checkpointing(self.pipe.unet, t.gradient_checkpointing)
        d = config.data
        self.folder = FolderDataset(d.path, d.size, d.random_crop, d.flip) if d.kind == "folder" else None
        if config.vae.latent_std and (t.base_model or config.vae.checkpoint):
            self._fit_scaling_factor(config.vae.latent_std)

    def _spec(self, name: str, module: torch.nn.Module, steps: int, lr: float, warmup: int | None = None,
              strategy: str = "ddp") -> StageSpec:
        t = self.config.train
        warmup = t.warmup_steps if warmup is None else warmup
        return StageSpec(name, module, steps, lr, t.weight_decay, tuple(t.adam_betas),
                         min(warmup, max(steps // 10, 1)), t.grad_accum, t.grad_clip, t.ema_decay,
                         t.mixed_precision, t.save_every, t.log_every, strategy)

    def _run(self, spec: StageSpec, batch, sample_every: int = 0):
        prefix = "" if spec.name == "unet" else f"{spec.name}-"  # refine's grids beside the unet stage's
        runner = StageRunner(spec, self.out, self.device, self.dist, lambda step: self._samples(prefix, step),
                             sample_every)
        if self.resume:  # from the stage's checkpoint, or from its start when it has none yet
            self.log.truncate(spec.name, runner.step if runner.load() else 0)
        ema = runner.run(batch, self.log, self.progress)
        if self.dist.main:
            loss_curve(self.log.records(), self.out / "loss.png")
        return ema

    def _images(self, step: int, micro: int, batch_size: int, dropout: float | None = None, free_fraction: float = 0.0):
        index = step * self.config.train.grad_accum + micro
        images, captions = make_batch(self.config.data, self.folder, index, batch_size, self.dist.rank,
                                      self.dist.world, dropout, free_fraction=free_fraction)
        return images.to(self.device), captions

    def _generator(self, step: int, micro: int) -> torch.Generator:
        return step_generator(self.config.train.seed, self.dist.rank, step, micro, self.device)

    def train_vae(self) -> None:
        v = self.config.vae
        vae = self.pipe.vae
        loss = VAELoss(vae, v.kl_weight, v.disc_weight, v.disc_channels, v.disc_layers, v.object_weight,
                       v.object_contrast, v.object_margin)
        loss = loss.to(self.device)
        spec = self._spec("vae", loss, v.steps, v.learning_rate)
        self._run(spec, self._reconstruction_batch(v.batch_size)).copy_to(spec.module)
        self._fit_scaling_factor(v.latent_std)

    def _reconstruction_batch(self, batch_size: int, free_fraction: float = 0.0):
        """The vae and decoder stages' batches: images, the posterior's sampling generator, whether the
        discriminator's term plays yet."""
        def batch(step: int, micro: int):
            images = self._images(step, micro, batch_size, 0.0, free_fraction)[0]
            return images, self._generator(step, micro), step >= self.config.vae.disc_start

        return batch

    def train_decoder(self) -> None:
        """The decoder (and post_quant_conv) alone, on the VAE stage's loss, the encoder frozen: the latent space and
        so the scaling factor stay as they are."""
        d, v = self.config.decoder, self.config.vae
        vae = self.pipe.vae
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
        loss = VAELoss(vae, 0.0, v.disc_weight, v.disc_channels, v.disc_layers, v.object_weight, v.object_contrast,
                       v.object_margin).to(self.device)
        spec = self._spec("decoder", loss, d.steps, d.learning_rate, d.warmup_steps)
        self._run(spec, self._reconstruction_batch(d.batch_size, d.free_fraction)).copy_to(spec.module)
        vae.requires_grad_(False)

    def _fit_scaling_factor(self, latent_std: float) -> None:
        """LDM's scale: latents * factor have standard deviation ``[vae] latent_std`` (1 in LDM, and when 0), so
        the diffusion's noise levels fit them; a larger one makes every noise level cleaner for the image."""
        with torch.no_grad():
            latents = torch.cat([self.pipe.vae.encode(self._images(10**6 + i, 0, 32, 0.0)[0]).mean
                                 for i in range(4)])
        self.pipe.config.vae.scaling_factor = float((latent_std or 1.0) / latents.std())

    def _diffusion_loss(self, train_text: bool, unet: torch.nn.Module | None = None,
                        kind: type[DiffusionLoss] = DiffusionLoss) -> DiffusionLoss:
        c, d = self.pipe.config, self.config.diffusion
        if c.is_refiner:
            raise ValueError("training the SDXL refiner is not supported: its y needs each image's aesthetic score, "
                             "which captions do not carry")
        abar = model_alphas_cumprod(c).to(self.device)
        return kind(unet or self.pipe.unet, self.pipe.text_encoders, abar, c.prediction, train_text,
                             d.loss_weighting, d.snr_gamma, d.snr_weight_cap or math.inf, d.snr_floor,
                             c.size_embed_dim if c.unet.adm_in_channels else 0, self.config.data.size)

    def _latent_batch(self, batch_size: int):
        scale = self.pipe.config.vae.scaling_factor
        caption_weights = self.config.diffusion.caption_weights

        def batch(step: int, micro: int):
            images, captions = self._images(step, micro, batch_size)
            generator = self._generator(step, micro)
            with torch.no_grad():
                latents = self.pipe.vae.encode(images).sample(generator) * scale
            ids = torch.stack([tokenizer(captions) for tokenizer in self.pipe.tokenizers]).to(self.device)
            if not caption_weights:  # the plain batch: no extra tensor, so results match older runs bit for bit
                return latents, ids, generator
            return latents, ids, generator, caption_loss_weights(captions, caption_weights).to(self.device)
        return batch

    def _steps(self) -> int:
        t = self.config.train
        if t.epochs and self.folder is not None:
            per_step = t.batch_size * t.grad_accum * self.dist.world
            return max(1, -(-t.epochs * len(self.folder) // per_step))
        return t.steps

    def _train_denoiser(self, name: str, steps: int, lr: float, warmup: int | None = None, batch: int = 0) -> None:
        """Algorithm 1 on the UNet (and the text encoder if so configured); the EMA weights are kept."""
        t = self.config.train
        self.pipe.vae.requires_grad_(False)
        loss = self._diffusion_loss(t.train_text_encoder)
        spec = self._spec(name, loss, steps, lr, warmup, t.strategy)
        ema = self._run(spec, self._latent_batch(batch or t.batch_size), t.sample_every)
        if self.dist.world > 1 and t.strategy == "fsdp":
            loss = self._unsharded(loss)
        ema.copy_to(loss)

    def _unsharded(self, loss: DiffusionLoss) -> DiffusionLoss:
        """After a sharded stage: the UNet and text encoders rebuilt as plain modules from the gathered weights."""
        from .sharding import full_weights

        weights = full_weights(loss)
        fresh = Pipeline.from_config(self.pipe.config).to(self.device)
        fresh.unet.load_state_dict({k.removeprefix("denoiser.unet."): v for k, v in weights.items()
                                    if k.startswith("denoiser.unet.")})
        for i, encoder in enumerate(fresh.text_encoders):
            encoder.load_state_dict({k.removeprefix(f"text_encoders.{i}."): v for k, v in weights.items()
                                     if k.startswith(f"text_encoders.{i}.")})
        self.pipe.unet, self.pipe.text_encoders = fresh.unet, fresh.text_encoders
        set_gradient_checkpointing(self.pipe.unet, self.config.train.gradient_checkpointing)
        return self._diffusion_loss(self.config.train.train_text_encoder)

    def train_unet(self) -> None:
        self._train_denoiser("unet", self._steps(), self.config.train.learning_rate)

    def train_refine(self) -> None:
        """The UNet stage again, from the weights the stages before left (the "unet" stage's EMA), at ``[refine]``'s
        learning rate, warm-up and batch size and, given ``[refine] latent_std``, a refitted latent scale."""
        r = self.config.refine
        if r.latent_std:
            self._fit_scaling_factor(r.latent_std)
        self._train_denoiser("refine", r.steps, r.learning_rate, r.warmup_steps, r.batch_size)

    def train_lora(self) -> None:
        t, lo = self.config.train, self.config.lora
        self.pipe.vae.requires_grad_(False)
        wrapped = add_lora(self.pipe.unet, lo.rank, lo.alpha, lo.targets)
        loss = self._diffusion_loss(False)
        spec = self._spec("lora", loss, self._steps(), t.learning_rate)
        self._run(spec, self._latent_batch(t.batch_size), t.sample_every).copy_to(loss)
        if self.dist.main:
            write_safetensors(self.out / lo.output, lora_state_dict(wrapped),
                              metadata={"ss_network_dim": str(lo.rank), "ss_network_alpha": str(lo.alpha)})
        remove_lora(self.pipe.unet, wrapped)

    def train_controlnet(self) -> None:
        """A ControlNet for the model (frozen): the encoder copied from its UNet, the hint encoder sized to its VAE's
        downscale, zero convolutions at zero; written to ``[controlnet] output`` with its config."""
        from ..checkpoints.controlnet import CONFIG_KEY
        from ..models.controlnet import ControlNet, ControlNetConfig

        c, t = self.config.controlnet, self.config.train
        self.pipe.vae.requires_grad_(False)
        self.pipe.unet.requires_grad_(False)
        levels = self.pipe.vae.downscale.bit_length() - 1  # 8 -> (16, 32, 96, 256) as cldm; 2 -> (16, 32)
        config = ControlNetConfig(dataclasses.replace(self.pipe.config.unet, in_channels=4, out_channels=4),
                                  hint_widths=(16, 32, 96, 256, 512)[:levels + 1])
        with torch.random.fork_rng():
            torch.manual_seed(t.seed)
            net = ControlNet(config).to(self.device)
        encoder = {k: v for k, v in self.pipe.unet.state_dict().items() if k in net.state_dict()
                   and v.shape == net.state_dict()[k].shape}  # the copy (a 9-channel UNet's first conv excepted)
        net.load_state_dict(encoder, strict=False)
        set_gradient_checkpointing(net, t.gradient_checkpointing)
        loss = self._diffusion_loss(False, HintedUNet(self.pipe.unet, net), ControlNetLoss)
        loss.object_weight = c.object_weight
        spec = self._spec("controlnet", loss, c.steps, c.learning_rate)
        controls = control_folder(self.folder, c.control_path) if self.folder is not None else True
        scale = self.pipe.config.vae.scaling_factor

        def batch(step: int, micro: int):
            index = step * t.grad_accum + micro
            images, hints, captions = make_batch(self.config.data, self.folder, index, c.batch_size, self.dist.rank,
                                                 self.dist.world, controls=controls, free_fraction=c.free_fraction,
                                                 outline_fraction=c.outline_fraction)
            generator = self._generator(step, micro)
            with torch.no_grad():
                latents = self.pipe.vae.encode(images.to(self.device)).sample(generator) * scale
            ids = torch.stack([tokenizer(captions) for tokenizer in self.pipe.tokenizers]).to(self.device)
            return latents, ids, generator, hints.to(self.device)

        self._run(spec, batch).copy_to(loss)
        if self.dist.main:
            dtype = DTYPES[t.export_dtype]
            write_safetensors(self.out / c.output, {k: v.to(dtype).contiguous() for k, v in net.state_dict().items()},
                              metadata={CONFIG_KEY: json.dumps(config.to_dict())})

    def train_clip(self) -> None:
        """A domain CLIP, contrastive on the training data; saved in transformers' CLIPModel layout."""
        from ..metrics.clip_score import CLIPScorer
        from ..models.clip_vision import CLIPPair, VisionConfig
        from ..models.configs import TextEncoderConfig

        c = self.config.clip
        text = TextEncoderConfig(width=c.text_width, layers=c.text_layers, heads=c.heads, intermediate=4 * c.text_width)
        vision = VisionConfig(image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width,
                              layers=c.vision_layers, heads=c.heads, intermediate=4 * c.vision_width)
        with torch.random.fork_rng():
            torch.manual_seed(self.config.train.seed)
            pair = CLIPPair(text, vision, c.projection_dim).to(self.device)
        spec = self._spec("clip", ContrastiveLoss(pair), c.steps, c.learning_rate)
        tokenizer = self.pipe.tokenizer

        def batch(step: int, micro: int):
            images, captions = self._images(step, micro, c.batch_size, 0.0)
            return images, tokenizer(captions).to(self.device)

        self._run(spec, batch).copy_to(spec.module)
        if self.dist.main:
            CLIPScorer(pair.eval(), tokenizer).save(self.out / c.output)

    def _samples(self, prefix: str, step: int) -> None:
        prompts = self.config.train.sample_prompts
        if prompts:
            self.pipe.unet.eval()
            sample_grid(self.pipe, prompts, self.out / "samples" / f"{prefix}step-{step:06d}.png")

    def run(self) -> Path:
        for stage in self.config.train.stages:
            getattr(self, f"train_{stage}")()
        model_path = self.out / "model.safetensors"
        if self.dist.main and {"vae", "decoder", "unet", "refine"} & set(self.config.train.stages):
            self.pipe.save(model_path, dtype=self.config.train.export_dtype)
            (self.out / "config.json").write_text(json.dumps(self.config.model_dump(), indent=1))
        return model_path


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    return Trainer(config, resume, progress).run()

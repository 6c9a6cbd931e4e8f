"""The Pipeline: a model family's components (UNet, VAE, text encoders, tokenizers) and how they load and save.

``load_pipeline(path_or_name)`` accepts an LDM/SGM single file (.safetensors, or .ckpt read weights-only),
a diffusers folder, or a preset name (random weights, for tests and benchmarks)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .backends import BACKENDS, use_backend
from .backends.int8 import calibration_run
from .checkpoints import diffusers_folder
from .checkpoints.detect import VAE_PREFIX, detect_config, detect_vae
from .checkpoints.errors import CheckpointError, first_line
from .checkpoints.hashes import model_hash
from .checkpoints.io import read_state_dict, write_safetensors
from .checkpoints.mapped import release
from .checkpoints.single_file import CONFIG_METADATA_KEY, join_components, split_components
from .generate import StepCallback, generate
from .models.attention import CrossAttention
from .models.clip import CLIPTextModel
from .models.configs import PRESETS, ModelConfig, preset
from .models.deepcache import resolve_branch
from .models.tokenizer import CLIPTokenizer
from .models.tome import set_token_merging
from .models.unet import UNetModel
from .models.vae import AttnBlock, AutoencoderKL
from .offload import MODES as OFFLOAD_MODES
from .offload import Offload, casts_as_it_runs, free_memory, replacing
from .request import GenerationRequest

BUILTIN_MODEL = Path(__file__).parent / "assets" / "builtin.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Pipeline:
    """Stable Diffusion's components; ``txt2img``/``img2img``/``inpaint`` build on them.

    ``unet(x, timesteps, context, y=None)``, ``vae.encode(img)`` / ``vae.decode(z)``, ``text_encoder(ids)``
    and ``tokenizer(texts)`` are called like the LDM originals. SDXL has two text encoders and tokenizers
    (``text_encoders``, ``tokenizers``); ``text_encoder``/``tokenizer`` are the first of each."""

    def __init__(self, config: ModelConfig, unet: UNetModel, vae: AutoencoderKL,
                 text_encoders: list[CLIPTextModel], tokenizers: list[CLIPTokenizer]) -> None:
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.stored_dtype = unet.dtype  # the dtype the weights had in the file they came from
        self.source_file: Path | None = None  # the single file it was loaded from (for A1111's "Model hash")
        self.offload: Offload | None = None  # set by enable_offload
        self.control_models: dict = {}  # ControlNets loaded for this pipeline's generations (control.py)
        self.backend = "torch"  # what runs the UNet and VAE decoder (set_backend)
        self.deepcache, self.deepcache_branch = None, 0  # DeepCache's interval and skip branch (models/deepcache.py)

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def model_hash(self) -> str | None:
        """A1111's short hash of the file the model came from (None for folders and presets)."""
        return model_hash(self.source_file) if self.source_file is not None else None

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.text_encoders[0]

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.tokenizers[0]

    @property
    def device(self) -> torch.device:
        """Where the networks run (with offload, not where the weights rest)."""
        return self.offload.device if self.offload is not None else self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"unet": self.unet, "vae": self.vae}
        mods.update({f"text_encoder_{i}": te for i, te in enumerate(self.text_encoders)})
        return mods

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move and cast the weights (with offload: run on ``device`` in ``dtype``, the weights resting where
        they are, in their own dtype when ``dtype`` is wider: offload.py). Weights that a cast or a move
        replaces give their memory-mapped pages back."""
        if self.offload is not None and device is not None:
            self.offload.device, device = torch.device(device), None
        if self.offload is not None and dtype is not None:
            self.offload.dtype = dtype
        for module in self.modules().values():
            if self.offload is not None and dtype is not None:
                module.compute_dtype = dtype
                if casts_as_it_runs(module, dtype):
                    continue  # cast unit by unit as it runs
            replacing(module, lambda m: m.to(device=device, dtype=dtype))
        return self

    def enable_offload(self, mode: str, device: str | torch.device | None = None) -> Pipeline:
        """``model`` or ``sequential`` offload to run on ``device`` (offload.py); ``none`` turns it off. The
        weights rest in host memory, as the file has them: load with ``load_pipeline(offload=...)`` so that
        they are not first copied into channels-last layout."""
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {mode!r}")
        device = torch.device(device) if device is not None else self.device
        compute = self.offload.dtype if self.offload is not None else None
        if self.offload is not None:
            self.offload.remove()
            self.offload = None
            for module in self.modules().values():
                module.__dict__.pop("compute_dtype", None)
        if mode == "none":
            return self.to(device, compute)
        self.to("cpu")
        entries = {"unet": [self.unet], "vae": [self.vae.encoder, self.vae.quant_conv, self.vae.post_quant_conv,
                                                self.vae.decoder]}
        entries.update({f"text_encoder_{i}": [te] for i, te in enumerate(self.text_encoders)})
        self.offload = Offload(self.modules(), entries, mode, device)
        return self.to(dtype=compute) if compute is not None else self  # a mode switch keeps the run's dtype

    def set_backend(self, name: str, int8: bool = False, int8_vae: bool = False) -> Pipeline:
        """Run the UNet and the VAE decoder on backend ``name`` ("torch", or "openvino" on the CPU: converted once
        per weights, cached on disk); ``int8`` / ``int8_vae``: the UNet / the VAE decoder quantized by NNCF,
        calibrated on a few generations (backends/int8.py). Absent: torch, with a notice (``self.backend``)."""
        calibrate = calibration_run(self)
        self.backend = use_backend(self.unet, self.vae, name, self.device, int8, calibrate, release, int8_vae)
        return self

    def set_attention_slicing(self, slicing: int | str | None) -> Pipeline:
        """Attention in query slices whose score matrix fits ``slicing`` MiB, or ``"auto"``: a quarter of the
        memory free on the device now; None: whole (models/attention.py ``attention``)."""
        budget = None
        if slicing == "auto":
            budget = free_memory(self.device) // 4
        elif slicing is not None:
            if isinstance(slicing, bool) or not isinstance(slicing, int) or slicing < 1:
                raise ValueError(f"attention slicing takes 'auto' or a size in MiB >= 1, not {slicing!r}")
            budget = slicing * 2**20
        for module in [self.unet, self.vae]:
            for block in module.modules():
                if isinstance(block, (CrossAttention, AttnBlock)):
                    block.max_bytes = budget
        return self

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}

    def component_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each module's weights, contiguous (NCHW) whatever the layout they run in."""
        return {name: {k: v.contiguous() for k, v in m.state_dict().items()} for name, m in self.modules().items()}

    def save(self, path: str | Path, format: str = "single-file", dtype: str | torch.dtype | None = None) -> None:
        """Write a single-file ``.safetensors`` (LDM/SGM layout) or a diffusers folder."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        parts = {name: {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in sd.items()}
                 for name, sd in self.component_state_dicts().items()}
        if format == "single-file":
            write_safetensors(path, join_components(parts, self.config),
                              metadata={CONFIG_METADATA_KEY: self.config.to_json(), "format": "pt"})
        elif format == "diffusers":
            diffusers_folder.write_folder(path, self.config, parts, self.tokenizers)
        else:
            raise ValueError(f"unknown format {format!r} (single-file or diffusers)")

    def txt2img(self, prompt: str | list[str] = "", callback: StepCallback | None = None,
                refiner: Pipeline | None = None, **fields: Any) -> list[Image.Image]:
        """Images from a prompt (a list: one image per prompt, in one batch); ``fields`` are GenerationRequest's
        (A1111 names: negative_prompt, steps, cfg_scale, sampler, seed, ...). ``refiner``: an SDXL refiner that
        takes over at ``refiner_switch_at`` (0.8 unless given)."""
        return generate(self, GenerationRequest(prompt=prompt, **fields), callback, refiner).images

    def img2img(self, init_image: Image.Image, prompt: str | list[str] = "", denoising_strength: float = 0.75,
                callback: StepCallback | None = None, refiner: Pipeline | None = None, **fields: Any) -> list[Image.Image]:
        """SDEdit from ``init_image``; the same fields as txt2img."""
        request = GenerationRequest(prompt=prompt, init_image=init_image, denoising_strength=denoising_strength, **fields)
        return generate(self, request, callback, refiner).images

    def inpaint(self, init_image: Image.Image, mask: Image.Image, prompt: str | list[str] = "",
                denoising_strength: float = 0.75, callback: StepCallback | None = None,
                refiner: Pipeline | None = None, **fields: Any) -> list[Image.Image]:
        """Repaint the white part of ``mask`` (blended latent diffusion, or the 9-channel model's own input);
        fields as txt2img plus mask_blur, inpainting_fill, inpainting_mask_invert, inpaint_full_res, ..."""
        request = GenerationRequest(prompt=prompt, init_image=init_image, mask=mask,
                                    denoising_strength=denoising_strength, **fields)
        return generate(self, request, callback, refiner).images

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0) -> Pipeline:
        """Random weights (PyTorch's default initialisation, seeded) for a config."""
        tokenizers = [CLIPTokenizer.builtin(tc.pad_token_id) for tc in config.text_encoders]
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without disturbing the caller's RNG
            torch.manual_seed(seed)
            pipe = cls(config, UNetModel(config.unet), AutoencoderKL(config.vae),
                       [CLIPTextModel(tc) for tc in config.text_encoders], tokenizers)
        for module in pipe.modules().values():
            module.eval()
        return pipe

    @classmethod
    def from_parts(cls, config: ModelConfig, parts: dict[str, dict[str, torch.Tensor]],
                   tokenizers: list[CLIPTokenizer], source: str = "checkpoint", channels_last: bool = True) -> Pipeline:
        """Build the modules on the meta device and adopt the given weights (strict: every key must fit)
        without copying them; ``channels_last`` copies the convolutions' weights into that faster layout."""
        with torch.device("meta"):
            pipe = cls(config, UNetModel(config.unet), AutoencoderKL(config.vae),
                       [CLIPTextModel(tc) for tc in config.text_encoders], tokenizers)
        for name, module in pipe.modules().items():
            _adopt(module, parts.get(name, {}), f"{source} ({name})")
            module.eval()
        pipe.stored_dtype = pipe.unet.dtype
        for module in (pipe.unet, pipe.vae):  # adopted file tensors arrive contiguous (NCHW)
            replacing(module, lambda m: m.to(memory_format=torch.channels_last if channels_last
                                              else torch.contiguous_format))
        return pipe


def _adopt(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{what}: weights do not fit the detected architecture: {'; '.join(detail)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=True, assign=True)


def _sidecar(path: Path) -> dict[str, str]:
    """A1111's convention: an LDM ``model.yaml`` beside ``model.safetensors``. The keys read from it are those
    that weights cannot tell: ``parameterization`` ("v"), ``num_head_channels`` and ``num_heads``."""
    for yaml in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if yaml.exists():
            text = yaml.read_text(errors="replace")
            found = {key: m.group(1) for key in ("parameterization", "num_head_channels", "num_heads")
                     if (m := re.search(rf"\b{key}:\s*[\"']?([\w-]+)", text))}
            return found
    return {}


def read_vae(path: str | Path, scaling_factor: float) -> tuple[object, dict[str, torch.Tensor]]:
    """A standalone VAE file (LDM names, with or without ``first_stage_model.``, or diffusers names)."""
    sd, _ = read_state_dict(path)
    if any(k.startswith("encoder.down_blocks.") for k in sd):  # diffusers layout: convert via our key map
        raise CheckpointError(f"{path}: diffusers-layout VAE files are read from a diffusers folder's vae/")
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in sd) else ""
    config = detect_vae(sd, prefix)
    config.scaling_factor = scaling_factor
    state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k[len(prefix):].startswith("loss.")}
    return config, state


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A torch device from a name ("cpu", "cuda", "cuda:1", "mps"; None: the CPU), checked to exist here."""
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {str(name)!r} (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r}: this machine has no CUDA GPU (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(name)!r} is not supported (cpu, cuda, cuda:N, mps)")
    return device


@dataclass
class RunOptions:
    """Where and how a loaded model runs: the CLI's --device, --dtype, --offload, --attention-slicing, --backend."""

    device: str | None = None
    dtype: str | None = None
    offload: str | None = None
    attention_slicing: int | str | None = None
    backend: str | None = None
    int8: bool = False
    deepcache: int | None = None
    tome: float | None = None
    deepcache_branch: int | str = 0
    int8_vae: bool = False

    def load(self, path_or_name: str | Path | None = None, **kwargs: Any) -> Pipeline:
        return load_pipeline(path_or_name, **asdict(self), **kwargs)


def load_pipeline(path_or_name: str | Path | None = None, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, *, prediction: str | None = None,
                  vae: str | Path | None = None, offload: str | None = None,
                  attention_slicing: int | str | None = None, backend: str | None = None,
                  int8: bool = False, deepcache: int | None = None, tome: float | None = None,
                  deepcache_branch: int | str = 0, int8_vae: bool = False) -> Pipeline:
    """Load a model: a single file, a diffusers folder, a preset name, or (None or "builtin") the built-in model.

    ``prediction`` ("eps" or "v") overrides the file's (SD2 768-v checkpoints look like eps ones); ``vae``: a
    standalone VAE file instead of the model's; ``offload`` ("model", "sequential"), ``attention_slicing`` (MiB or
    "auto"), ``backend``, ``int8``, ``int8_vae``: enable_offload's, set_attention_slicing's, set_backend's (int8
    implies openvino); ``deepcache``: a whole UNet pass every that many steps, the deep feature at skip branch
    ``deepcache_branch`` (or "level") reused between (models/deepcache.py); ``tome``: that share of the tokens
    merged in the highest-resolution self-attention (models/tome.py). A ``.safetensors`` is memory-mapped."""
    if offload not in (None, *OFFLOAD_MODES):
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {offload!r}")
    offloaded = offload not in (None, "none")
    backend = "openvino" if (int8 or int8_vae) and backend is None else backend
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend not in (None, "torch") and (offloaded or attention_slicing is not None):
        raise ValueError(f"the {backend} backend holds whole compiled networks and runs attention in its own "
                         "kernels: drop offload / attention slicing")
    if path_or_name is None or (str(path_or_name) == "builtin" and not Path("builtin").exists()):
        if not BUILTIN_MODEL.exists():
            raise CheckpointError(f"the built-in model is not installed ({BUILTIN_MODEL}); pass a model path")
        path_or_name = BUILTIN_MODEL
    name = str(path_or_name)
    if name in PRESETS and not Path(name).exists():
        pipe = Pipeline.from_config(preset(name))
    else:
        path = Path(path_or_name)
        if path.is_dir():
            config, parts, tokenizers = diffusers_folder.read_folder(path)
        else:
            sd, metadata = read_state_dict(path)
            sidecar = _sidecar(path)
            heads = {k: int(v) for k, v in sidecar.items() if k in ("num_head_channels", "num_heads")
                     and v.lstrip("-").isdigit()}
            try:
                config = ModelConfig.from_json(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata \
                    else detect_config(sd, heads)
            except (CheckpointError, KeyError, TypeError, ValueError) as error:
                raise CheckpointError(f"{path}: {first_line(error)}") from None
            parts = split_components(sd, config)
            if not parts["vae"] and vae is None:
                raise CheckpointError(f"{path}: has no VAE weights (first_stage_model.*); pass a VAE file")
            hinted = {"v": "v", "eps": "eps"}.get(sidecar.get("parameterization", "")) or ("v" if "v_pred" in sd
                                                                                            else None)
            hinted = hinted or {"v": "v", "epsilon": "eps"}.get(metadata.get("modelspec.prediction_type", ""))
            if hinted:
                config = config.replace(prediction=hinted)
            tokenizers = [CLIPTokenizer.builtin(tc.pad_token_id) for tc in config.text_encoders]
        if vae is not None:
            vae_config, parts["vae"] = read_vae(vae, config.vae.scaling_factor)
            config = config.replace(vae=vae_config)
        if prediction:
            if prediction not in ("eps", "v"):
                raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
            # SD 2.x's v-prediction checkpoints at full size are its 768-pixel models; other sizes keep theirs
            full_size_sd2 = config.family == "sd2" and config.unet.model_channels == 320
            config = config.replace(prediction=prediction, image_size=768 if prediction == "v" and full_size_sd2
                                    else config.image_size)
        pipe = Pipeline.from_parts(config, parts, tokenizers, source=str(path),  # a compiled backend: no copies
                                   channels_last=not offloaded and backend in (None, "torch"))
        pipe.source_file = None if path.is_dir() else path
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    device = resolve_device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    if offloaded:  # after enable_offload, a wider dtype leaves the file's weights as they are (offload.py)
        pipe.enable_offload(offload, device).to(dtype=dtype)
    else:
        pipe.to(device=device, dtype=dtype)
    pipe.deepcache, pipe.deepcache_branch = deepcache, resolve_branch(pipe.unet, deepcache, deepcache_branch)
    set_token_merging(pipe.unet, tome)
    return pipe.set_attention_slicing(attention_slicing).set_backend(backend or "torch", int8, int8_vae)

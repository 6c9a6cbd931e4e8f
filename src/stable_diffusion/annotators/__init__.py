"""ControlNet preprocessors that need model weights ("annotators"): lineart (``sk_model.pth``, ``sk_model2.pth``),
OpenPose's body model (``body_pose_model.pth``) and MiDaS DPT-Hybrid depth (``dpt_hybrid-midas-501f0c75.pt``). No
weights are downloaded or shipped: each file is looked up by its usual name in the annotators folder
(``$SD_ANNOTATORS_DIR``, else the models folder's ``annotators/``, searched recursively, so the extension's
``downloads/<name>/`` layout works), and a preprocessor whose file is absent is listed as unavailable with the file
it needs. Like the extension, the image is padded (edge pixels) to multiples of 64 for the network and the map
cropped back."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoints.io import read_state_dict

DEFAULT_DIR = Path("models") / "annotators"


@dataclass(frozen=True)
class Annotator:
    file: str  # the weights' usual file name (the extension's and controlnet_aux's)
    build: Callable[[dict[str, torch.Tensor]], torch.nn.Module]  # the network from the file's tensors, strictly
    run: Callable[[torch.nn.Module, np.ndarray], np.ndarray]  # (net, (H, W, 3) uint8 RGB) -> the map, uint8


def _lineart(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from .lineart import LineartGenerator

    net = LineartGenerator()
    net.load_state_dict(state, strict=True)
    return net


def _body(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from .openpose import BodyPoseNet

    net = BodyPoseNet()
    net.load_flat(state)
    return net


def _midas(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from .midas import DPTDepth

    net = DPTDepth()
    net.load_file(state)
    return net


def _run_midas(net: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    from .midas import depth_map

    return depth_map(net, pixels)


def _run_lineart(net: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    from .lineart import lineart

    return lineart(net, pixels)


def _run_openpose(net: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    from .openpose import openpose

    return openpose(net, pixels)


ANNOTATORS: dict[str, Annotator] = {  # the extension's module names
    "lineart_realistic": Annotator("sk_model.pth", _lineart, _run_lineart),
    "lineart_coarse": Annotator("sk_model2.pth", _lineart, _run_lineart),
    "openpose": Annotator("body_pose_model.pth", _body, _run_openpose),
    "depth_midas": Annotator("dpt_hybrid-midas-501f0c75.pt", _midas, _run_midas),
}
ANNOTATORS["depth"] = ANNOTATORS["depth_midas"]  # the extension's older name, still accepted
_loaded: dict[Path, torch.nn.Module] = {}
_lock = threading.Lock()


def annotators_dir(folder: str | Path | None = None) -> Path:
    """The folder searched for annotator weights: ``$SD_ANNOTATORS_DIR``, else ``folder`` (the models folder's
    annotators/), else ./models/annotators."""
    return Path(os.environ.get("SD_ANNOTATORS_DIR") or folder or DEFAULT_DIR)


def weights_file(module: str, folder: str | Path | None = None) -> Path | None:
    """The module's weights file in the annotators folder (or below it), or None."""
    root, name = annotators_dir(folder), ANNOTATORS[module].file
    if (root / name).is_file():
        return root / name
    return next((p for p in sorted(root.rglob(name)) if p.is_file()), None) if root.is_dir() else None


def availability(folder: str | Path | None = None) -> tuple[list[str], dict[str, str]]:
    """(modules whose weights are present, {module: the weights file it needs} for the others)."""
    found = [module for module in ANNOTATORS if weights_file(module, folder)]
    return found, {module: a.file for module, a in ANNOTATORS.items() if module not in found}


def check_available(module: str, folder: str | Path | None = None) -> Path:
    """The module's weights file; a one-line ValueError naming the file and folder when it is absent."""
    path = weights_file(module, folder)
    if path is None:
        raise ValueError(f"control module {module!r} needs {ANNOTATORS[module].file} in {annotators_dir(folder)} "
                         f"(nothing is downloaded here: put the file there or set SD_ANNOTATORS_DIR)")
    return path


def _net(module: str, folder: str | Path | None) -> torch.nn.Module:
    path = check_available(module, folder).resolve()
    with _lock:
        if path not in _loaded:
            state, _ = read_state_dict(path)
            try:
                net = ANNOTATORS[module].build({k: v.float() for k, v in state.items()})
            except (RuntimeError, ValueError) as error:
                raise ValueError(f"{path.name} is not the {module} model: {str(error).splitlines()[0][:200]}") from None
            _loaded.clear()  # one annotator in memory at a time
            _loaded[path] = net.eval()
        return _loaded[path]


def annotate(module: str, image: Image.Image, folder: str | Path | None = None) -> Image.Image:
    """The control map of ``image`` by the module's network (padded to multiples of 64 with its edge pixels, as
    the extension does, and cropped back)."""
    net = _net(module, folder)
    pixels = np.asarray(image.convert("RGB"))
    h, w = pixels.shape[:2]
    padded = np.pad(pixels, ((0, -h % 64), (0, -w % 64), (0, 0)), mode="edge")
    with _lock:  # the nets are not re-entrant across threads (one CPU set either way)
        try:
            result = ANNOTATORS[module].run(net, padded)[:h, :w]
        except ImportError as error:
            raise ValueError(f"the {module} preprocessor needs {error.name}: pip install "
                             f"\"stable_diffusion[controlnet]\" (OpenCV, SciPy)") from None
    return Image.fromarray(np.ascontiguousarray(result)).convert("RGB")

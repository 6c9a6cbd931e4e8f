"""Every sampler k-diffusion has, against k-diffusion's own function (the test oracle A1111 runs), on the exact
denoiser of Gaussian data with the same sigmas and the same noise (a shared generator, or the same Brownian
trees), within 1e-4; our Brownian-tree noise equals k-diffusion's for the same seeds; the schedules equal
k-diffusion's and A1111's definitions; the samplers A1111 adds (Restart, DDIM CFG++) are checked by their
defining properties. k-diffusion is installed off the import path (.venv/oracles, see the Makefile) and its
sampling module is loaded without the package's __init__, which needs torchvision."""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch

from stable_diffusion.diffusion.denoiser import CFGDenoiser
from stable_diffusion.diffusion.noise import BrownianNoise
from stable_diffusion.diffusion.samplers import SAMPLERS, sample_ddim, sample_heun, sampling_sigmas
from stable_diffusion.diffusion.schedules import (
    DiscreteSigmas,
    alphas_cumprod,
    make_betas,
    make_sigmas,
    scheduler_name,
)

from .test_samplers import MU, S, gaussian_x0


@pytest.fixture(scope="module")
def kd():
    root = Path(sys.prefix) / "oracles" / "k_diffusion"
    assert root.is_dir(), f"{root} is missing: `make venv` installs k-diffusion there"
    saved = {name: sys.modules.get(name) for name in ("k_diffusion", "k_diffusion.sampling", "k_diffusion.utils",
                                                      "torchvision", "torchvision.transforms")}
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    sys.modules["k_diffusion"] = package
    if importlib.util.find_spec("torchvision") is None:  # k_diffusion.utils imports it; the samplers never use it
        vision, transforms = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
        transforms.functional = types.ModuleType("torchvision.transforms.functional")
        vision.transforms = transforms
        sys.modules.update({"torchvision": vision, "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": transforms.functional})
    try:
        yield importlib.import_module("k_diffusion.sampling")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSigmas(alphas_cumprod(make_betas("scaled_linear")))


def _start(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(seed)) * 14.6


def _shared_noise(seed: int):
    """The same draws for both sides: k-diffusion's noise_sampler(sigma, sigma_next) and our noise(like, ...)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda like, *sigmas: torch.randn(like.shape, generator=generator)


def _kd_model(x, sigma, **kwargs):
    return gaussian_x0(x, sigma.reshape(-1, *([1] * (x.dim() - 1))))


def _ours_model(x, sigma):
    return gaussian_x0(x, sigma.reshape(-1)[0])


STEP_SAMPLERS = ["Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
                 "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"]
KD_NAMES = {"Euler": "sample_euler", "Euler a": "sample_euler_ancestral", "Heun": "sample_heun",
            "DPM2": "sample_dpm_2", "DPM2 a": "sample_dpm_2_ancestral", "LMS": "sample_lms",
            "DPM++ 2S a": "sample_dpmpp_2s_ancestral", "DPM++ 2M": "sample_dpmpp_2m", "DPM++ SDE": "sample_dpmpp_sde",
            "DPM++ 2M SDE": "sample_dpmpp_2m_sde", "DPM++ 2M SDE Heun": "sample_dpmpp_2m_sde",
            "DPM++ 3M SDE": "sample_dpmpp_3m_sde"}


@pytest.mark.parametrize("name", STEP_SAMPLERS)
def test_step_samplers_match_k_diffusion(kd, schedule, name):
    spec = SAMPLERS[name]
    sigmas = sampling_sigmas(name, spec.scheduler, 12, schedule)
    x = _start()
    theirs_fn = getattr(kd, KD_NAMES[name])
    kwargs = dict(spec.options)
    if spec.brownian:  # the same Brownian trees on both sides
        seeds = [11, 12, 13]
        ours_noise = BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), seeds)
        theirs_noise = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    else:
        ours_noise, shared = _shared_noise(5), _shared_noise(5)
        theirs_noise = lambda sigma, sigma_next: shared(x)  # noqa: E731
    if "noise_sampler" in inspect.signature(theirs_fn).parameters:
        theirs = theirs_fn(_kd_model, x.clone(), sigmas, disable=True, noise_sampler=theirs_noise, **kwargs)
    else:
        theirs = theirs_fn(_kd_model, x.clone(), sigmas, disable=True, **kwargs)
    ours = spec.fn(_ours_model, x.clone(), sigmas, noise=ours_noise, **kwargs)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale, (name, (ours - theirs).abs().max())


@pytest.mark.parametrize("name,eta", [("DPM fast", 0.0), ("DPM fast", 1.0), ("DPM adaptive", 0.0),
                                      ("DPM adaptive", 1.0)])
def test_dpm_solver_samplers_match_k_diffusion(kd, schedule, name, eta):
    """A1111 calls these with the schedule's first and last positive sigma and, for DPM fast, its step count."""
    sigmas = make_sigmas("uniform", 15, schedule)
    x = _start(1)
    ours_noise, shared = _shared_noise(9), _shared_noise(9)
    ours = SAMPLERS[name].fn(_ours_model, x.clone(), sigmas, noise=ours_noise, eta=eta)
    common = dict(sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]), disable=True, eta=eta,
                  noise_sampler=lambda sigma, sigma_next: shared(x))
    if name == "DPM fast":
        theirs = kd.sample_dpm_fast(_kd_model, x.clone(), n=len(sigmas) - 1, **common)
    else:
        theirs = kd.sample_dpm_adaptive(_kd_model, x.clone(), **common)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), (ours - theirs).abs().max()


def test_brownian_noise_is_k_diffusions_and_the_same_in_any_batch(kd, schedule):
    sigmas = make_sigmas("karras", 8, schedule)
    x = _start()
    ours = BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), [1, 2, 3])
    theirs = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[1, 2, 3])
    alone = BrownianNoise(x[1:2], sigmas[sigmas > 0].min(), sigmas.max(), [2])
    for i in range(len(sigmas) - 2):
        step = ours(x, sigmas[i], sigmas[i + 1])
        assert torch.equal(step, theirs(sigmas[i], sigmas[i + 1]))
        assert torch.equal(step[1:2], alone(x[1:2], sigmas[i], sigmas[i + 1]))


@pytest.mark.parametrize("name", ["karras", "exponential", "polyexponential"])
def test_k_diffusion_schedules(kd, schedule, name):
    ours = make_sigmas(name, 13, schedule)
    theirs = getattr(kd, f"get_sigmas_{name}")(13, schedule.sigma_min, schedule.sigma_max)
    assert torch.allclose(ours, theirs.float(), rtol=1e-5)


def test_a1111_schedules_by_definition(schedule):
    from scipy import stats

    low, high = schedule.sigma_min, schedule.sigma_max
    kl = make_sigmas("KL Optimal", 9, schedule)  # A1111: tan of evenly spaced arctan, ending at sigma_min
    assert len(kl) == 10 and kl[-1] == pytest.approx(low, rel=1e-5) and kl[0] == pytest.approx(high, rel=1e-5)
    assert torch.allclose(kl.atan().diff(), kl.atan().diff()[0].expand(9), atol=1e-6)
    quantiles = [stats.beta.ppf(1 - q, 0.6, 0.6) for q in torch.linspace(0, 1, 9).tolist()]
    beta = make_sigmas("Beta", 9, schedule)
    assert torch.allclose(beta[:-1], torch.tensor([low + q * (high - low) for q in quantiles]).float(), rtol=1e-5)
    ays = make_sigmas("Align Your Steps", 10, schedule)  # the table itself at 10 steps
    assert ays.tolist()[:3] == pytest.approx([14.615, 6.475, 3.861], rel=1e-6) and ays[-1] == 0
    assert make_sigmas("align_your_steps", 10, schedule, family="sdxl")[1] == pytest.approx(6.315, rel=1e-6)
    longer = make_sigmas("align_your_steps", 20, schedule)
    assert len(longer) == 21 and longer[0] == pytest.approx(14.615) and longer[-2] == pytest.approx(0.029)
    assert torch.all(longer[:-1].diff() < 0)
    for alias, name in (("SGM Uniform", "sgm_uniform"), ("SGMUniform", "sgm_uniform"), ("ddim_uniform", "ddim"),
                        ("Karras", "karras"), ("kl optimal", "kl_optimal")):
        assert scheduler_name(alias) == name


def test_discard_next_to_last_sigma_as_a1111(schedule):
    plain = make_sigmas("karras", 11, schedule)
    assert torch.equal(sampling_sigmas("DPM2", "karras", 10, schedule), torch.cat([plain[:-2], plain[-1:]]))
    assert len(sampling_sigmas("Euler", "karras", 10, schedule)) == 11


def test_restart_below_20_steps_is_heun_and_above_keeps_the_data_distribution(schedule):
    sigmas = make_sigmas("karras", 12, schedule).double()
    x = _start().double()
    assert torch.equal(SAMPLERS["Restart"].fn(_ours_model, x, sigmas), sample_heun(_ours_model, x, sigmas))
    x = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = make_sigmas("karras", 24, schedule).double()
    calls = []
    out = SAMPLERS["Restart"].fn(_ours_model, x, sigmas, callback=calls.append, noise=_shared_noise(3))
    seen = [float(c["sigma"]) for c in calls]
    assert len(seen) == 24 and any(b > a for a, b in zip(seen, seen[1:]))  # 24 steps, one segment going back up
    assert max(b for a, b in zip(seen, seen[1:]) if b > a) == pytest.approx(2.0, rel=0.3)  # up to sigma ~2
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - S) < 0.02  # samples of N(MU, S^2)


def test_ddim_cfgpp_is_ddim_without_a_guidance_gap_and_renoises_with_the_unconditional(schedule):
    sigmas = make_sigmas("ddim", 10, schedule).double()
    x = _start().double()

    def denoiser(x, sigma, context, y=None):  # context 1.0: the data mean moves to MU + 0.2
        return gaussian_x0(x, sigma.reshape(-1, 1, 1, 1)) + 0.2 * context.reshape(-1, 1, 1, 1)

    same = CFGDenoiser(denoiser, torch.ones(3), torch.ones(3), 7.0)
    assert torch.allclose(SAMPLERS["DDIM CFG++"].fn(same, x, sigmas), sample_ddim(same, x, sigmas), atol=1e-9)
    guided = CFGDenoiser(denoiser, torch.ones(3), torch.zeros(3), 12.5)  # CFG++ guidance 1: the condition
    step = SAMPLERS["DDIM CFG++"].fn(guided, x, sigmas[[0, 1]])  # one step
    x0_cond, x0_uncond = denoiser(x, sigmas[:1], torch.ones(3)), denoiser(x, sigmas[:1], torch.zeros(3))
    assert torch.allclose(step, x0_cond + sigmas[1] * (x - x0_uncond) / sigmas[0], atol=1e-9)


@pytest.mark.parametrize("sampler,order", [(partial(SAMPLERS["DPM++ 3M SDE"].fn, eta=0.0), 2),  # its 1st-order start
                                           (partial(SAMPLERS["DPM++ 2M SDE Heun"].fn, eta=0.0,
                                                    solver_type="heun"), 2)])
def test_new_multistep_samplers_converge_at_their_order(sampler, order):
    from .test_samplers import test_convergence_order_on_gaussian_data

    test_convergence_order_on_gaussian_data(sampler, order)


def test_every_a1111_sampler_and_schedule_exists():
    from stable_diffusion.diffusion.schedules import SCHEDULERS

    a1111_samplers = {"DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
                      "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart",
                      "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM"}
    assert a1111_samplers <= set(SAMPLERS)
    labels = {"Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps",
              "Simple", "Normal", "DDIM", "Beta"}
    assert labels == {s.label for s in SCHEDULERS.values()}

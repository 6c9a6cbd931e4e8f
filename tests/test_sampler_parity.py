"""The rest of the samplers against diffusers' scheduler loops: same denoiser (the exact one for Gaussian data),
same sigmas, same injected noise -> the same final latent. See test_samplers.py for Euler, DPM++ 2M, DDIM, DDPM."""

from __future__ import annotations

import math

import pytest
import torch

from stable_diffusion.diffusion.samplers import (
    default_noise,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_heun,
    sample_lcm,
    sample_lms,
    sample_plms,
    sample_unipc,
)

from .test_samplers import MU, S, gaussian_x0

COMMON = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _current_sigma(scheduler) -> torch.Tensor:
    """The sigma at which the scheduler evaluates the model now (KDPM2 alternates with its log-midpoints)."""
    if hasattr(scheduler, "sigmas_interpol") and not scheduler.state_in_first_order:
        ancestral = "Ancestral" in type(scheduler).__name__  # it indexes its midpoints one behind
        return scheduler.sigmas_interpol[scheduler.step_index - ancestral]
    return scheduler.sigmas[scheduler.step_index]


def _ve_loop(scheduler, x_t, n, generator=None):
    """A k-diffusion-style scheduler (x = x0 + sigma * eps): returns the final x and the distinct sigmas used."""
    scheduler.set_timesteps(n)
    sigmas = torch.unique_consecutive(scheduler.sigmas.float())
    x = x_t * sigmas[0]
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        sigma = _current_sigma(scheduler)
        eps = (x - gaussian_x0(x, sigma)) / sigma
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x, sigmas


def _vp_loop(scheduler, x_t, n, generator=None, sigma_of=None):
    """A scheduler that keeps x_vp = x / sqrt(sigma^2 + 1); ``sigma_of(i, t)`` gives the sigma of call i."""
    scheduler.set_timesteps(n)
    abar = scheduler.alphas_cumprod
    sigma_of = sigma_of or (lambda i, t: ((1 - abar[t]) / abar[t]).sqrt())
    used = [sigma_of(i, t).float() for i, t in enumerate(scheduler.timesteps)]
    x = x_t * used[0] / (used[0] ** 2 + 1).sqrt()
    for sigma, t in zip(used, scheduler.timesteps):
        x_ve = x * (sigma**2 + 1).sqrt()
        eps = (x_ve - gaussian_x0(x_ve, sigma)) / sigma
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    final = scheduler.sigmas[-1].float() if hasattr(scheduler, "sigmas") else torch.zeros(())
    return x * (final**2 + 1).sqrt(), torch.unique_consecutive(torch.stack(used + [final]))


def _check(ours, expected):
    assert torch.isfinite(expected).all()
    assert torch.allclose(ours, expected.float(), atol=1e-4), (ours - expected).abs().max()


@pytest.fixture
def x_t():
    torch.manual_seed(0)
    return torch.randn(2, 4, 8, 8)


@pytest.mark.parametrize("name", ["Heun", "DPM2", "LMS"])
def test_deterministic_k_samplers_match_diffusers(name, x_t):
    import diffusers

    scheduler, sampler = {
        "Heun": (diffusers.HeunDiscreteScheduler, sample_heun),
        "DPM2": (diffusers.KDPM2DiscreteScheduler, sample_dpm_2),
        "LMS": (diffusers.LMSDiscreteScheduler, sample_lms),
    }[name]
    expected, sigmas = _ve_loop(scheduler(**COMMON, use_karras_sigmas=True), x_t, 12)
    _check(sampler(gaussian_x0, x_t * sigmas[0], sigmas), expected)


def test_dpm2_ancestral_matches_diffusers_with_the_same_noise(x_t):
    from diffusers import KDPM2AncestralDiscreteScheduler

    expected, sigmas = _ve_loop(KDPM2AncestralDiscreteScheduler(**COMMON, use_karras_sigmas=True), x_t, 12,
                                torch.Generator().manual_seed(4))
    ours = sample_dpm_2_ancestral(gaussian_x0, x_t * sigmas[0], sigmas,
                                  noise=default_noise(torch.Generator().manual_seed(4)))
    _check(ours, expected)


def test_dpmpp_2s_matches_diffusers_singlestep(x_t):
    """DPMSolverSinglestep order 2 on log-uniform sigmas: every odd sigma is the log-midpoint of its neighbours,
    which is where DPM++ 2S evaluates its half step; eta = 0 makes ours deterministic."""
    from diffusers import DPMSolverSinglestepScheduler

    scheduler = DPMSolverSinglestepScheduler(**COMMON, solver_order=2, use_exponential_sigmas=True,
                                             final_sigmas_type="zero", lower_order_final=True)
    expected, sigmas = _vp_loop(scheduler, x_t, 13, sigma_of=lambda i, t: scheduler.sigmas[i])
    main = torch.cat([sigmas[:-1:2], sigmas[-1:]])  # s0, s2, ..., s12, 0
    _check(sample_dpmpp_2s_ancestral(gaussian_x0, x_t * main[0], main, eta=0.0), expected)


def test_plms_matches_diffusers_pndm(x_t):
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(**COMMON, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1)
    expected, sigmas = _vp_loop(scheduler, x_t, 12)
    assert len(sigmas) == 13
    _check(sample_plms(gaussian_x0, x_t * sigmas[0], sigmas), expected)


@pytest.mark.parametrize("order,variant,karras,final", [(3, "bh1", False, "sigma_min"), (2, "bh2", True, "zero"),
                                                        (3, "bh2", True, "zero")])
def test_unipc_matches_diffusers(order, variant, karras, final, x_t):
    """(diffusers' bh1 turns the last step to sigma 0 into NaN, -inf * 0, so that case stops at sigma_min.)"""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(**COMMON, solver_order=order, solver_type=variant, use_karras_sigmas=karras,
                                        final_sigmas_type=final, lower_order_final=True)
    expected, sigmas = _vp_loop(scheduler, x_t, 12, sigma_of=lambda i, t: scheduler.sigmas[i])
    _check(sample_unipc(gaussian_x0, x_t * sigmas[0], sigmas, order=order, variant=variant), expected)


def test_lcm_matches_diffusers_with_the_same_noise(x_t):
    """diffusers' LCM adds the consistency-model boundary scalings; a huge timestep_scaling makes them the
    identity (c_skip -> 0, c_out -> 1), which is the plain x0-jump-and-renoise loop."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**COMMON, timestep_scaling=1e7, set_alpha_to_one=True)
    expected, sigmas = _vp_loop(scheduler, x_t, 6, torch.Generator().manual_seed(2))
    ours = sample_lcm(gaussian_x0, x_t * sigmas[0], sigmas, noise=default_noise(torch.Generator().manual_seed(2)))
    _check(ours, expected)


def test_dpmpp_sde_is_reproducible_and_samples_the_data():
    torch.manual_seed(0)
    x_t = torch.randn(4000, dtype=torch.float64) * 14.6
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(14.6), math.log(0.03), 20, dtype=torch.float64)),
                        torch.zeros(1, dtype=torch.float64)])
    runs = [sample_dpmpp_sde(gaussian_x0, x_t, sigmas, noise=default_noise(torch.Generator().manual_seed(1)))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert abs(runs[0].mean().item() - MU) < 0.05 and abs(runs[0].std().item() - S) < 0.1

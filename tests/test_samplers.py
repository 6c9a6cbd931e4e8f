"""Schedules and samplers: the same denoiser, sigmas and noise as diffusers' scheduler loops give the same
latent, and on Gaussian data (exact denoiser known) errors shrink with steps at the expected order."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from stable_diffusion.diffusion.denoiser import CFGDenoiser, Denoiser
from stable_diffusion.diffusion.samplers import (
    SAMPLERS,
    default_noise,
    resolve_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
    sample_plms,
    sample_unipc,
)
from stable_diffusion.diffusion.schedules import DiscreteSigmas, alphas_cumprod, make_betas, make_sigmas

MU, S = 0.3, 0.6  # data ~ N(MU, S^2) per element


def gaussian_x0(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser E[x0 | x] for Gaussian data."""
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def exact_solution(x_t: torch.Tensor, sigma_t: float) -> torch.Tensor:
    """The probability-flow ODE solved in closed form from sigma_t down to 0."""
    return MU + (x_t - MU) * S / math.sqrt(S**2 + sigma_t**2)


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSigmas(alphas_cumprod(make_betas("scaled_linear")))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_denoiser_loss_is_algorithm_1_on_the_forward_process(prediction):
    """Denoiser.loss feeds the network x_t = sqrt(abar) x0 + sqrt(1 - abar) noise at integer t (Ho et al. 2020,
    eq. 4) and scores it against the noise (eps) or v = sqrt(abar) noise - sqrt(1 - abar) x0; a network that
    predicts its target exactly has zero loss, and its x0 through the sampling forward() is x0."""
    abar = alphas_cumprod(make_betas("linear", 1000, 1e-4, 0.02))
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    t = torch.tensor([0, 500, 999])
    a = abar[t].reshape(-1, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).float()
    target = (noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0).float()
    seen = {}

    def oracle(x, timesteps, context=None, y=None):  # the exact target, looked up by the input it is given
        seen["x"], seen["t"] = x, timesteps
        return target

    denoiser = Denoiser(oracle, abar, prediction)
    loss = denoiser.loss(x0, noise, t)
    assert torch.allclose(seen["x"], x_t, atol=1e-5) and torch.equal(seen["t"], t)  # float32 vs float64 rounding
    assert loss.shape == (3,) and loss.max() < 1e-9
    sigma = ((1 - a) / a).sqrt().float().flatten()
    assert torch.allclose(denoiser(x0 + noise * sigma.reshape(-1, 1, 1, 1), sigma), x0, atol=1e-4)


def test_sigma_t_round_trip_and_uniform_hits_training_sigmas(schedule):
    t = torch.tensor([0.0, 10.5, 999.0])
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-3)
    sigmas = make_sigmas("uniform", 4, schedule)  # t = 999, 666, 333, 0
    assert torch.allclose(sigmas[:-1], schedule.sigmas[[999, 666, 333, 0]], rtol=1e-5)
    for name in ("karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "normal"):
        s = make_sigmas(name, 10, schedule)
        assert len(s) == 11 and s[-1] == 0 and bool((s[:-1] > 0).all()) and bool((s[1:] < s[:-1]).all()), name


def test_karras_sigmas_match_diffusers(schedule):
    from diffusers import EulerDiscreteScheduler

    theirs = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    use_karras_sigmas=True)
    theirs.set_timesteps(12)
    assert torch.allclose(make_sigmas("karras", 12, schedule), theirs.sigmas.float(), rtol=1e-4)


def _diffusers_loop(scheduler, x_t, n, ancestral_generator=None, vp=False):
    """diffusers' own loop; ``vp``: the scheduler keeps x / sqrt(sigma^2 + 1) (DPM-Solver) instead of x."""
    scheduler.set_timesteps(n)
    sigma0 = scheduler.sigmas[0]
    x = x_t * sigma0 / (sigma0**2 + 1).sqrt() if vp else x_t * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        x_ve = x * (sigma**2 + 1).sqrt() if vp else x
        eps = (x_ve - gaussian_x0(x_ve, sigma)) / sigma  # an eps-prediction model
        kwargs = {"generator": ancestral_generator} if ancestral_generator is not None else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x, scheduler.sigmas.float()


@pytest.mark.parametrize("kind", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE"])
def test_samplers_match_diffusers_loops(kind):
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, dtype=torch.float64).float()
    if kind == "Euler":
        expected, sigmas = _diffusers_loop(EulerDiscreteScheduler(**common), x_t, 15)
        ours = sample_euler(gaussian_x0, x_t * sigmas[0], sigmas)
    elif kind == "Euler a":
        expected, sigmas = _diffusers_loop(EulerAncestralDiscreteScheduler(**common), x_t, 15,
                                           torch.Generator().manual_seed(7))
        ours = sample_euler_ancestral(gaussian_x0, x_t * sigmas[0], sigmas,
                                      noise=default_noise(torch.Generator().manual_seed(7)))
    elif kind == "DPM++ 2M":
        scheduler = DPMSolverMultistepScheduler(**common, use_karras_sigmas=True, final_sigmas_type="zero",
                                                lower_order_final=False, euler_at_final=False)
        expected, sigmas = _diffusers_loop(scheduler, x_t, 15, vp=True)
        ours = sample_dpmpp_2m(gaussian_x0, x_t * sigmas[0], sigmas)
    else:
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True,
                                                final_sigmas_type="zero", lower_order_final=False,
                                                euler_at_final=False)
        expected, sigmas = _diffusers_loop(scheduler, x_t, 15, torch.Generator().manual_seed(3), vp=True)
        ours = sample_dpmpp_2m_sde(gaussian_x0, x_t * sigmas[0], sigmas,
                                   noise=default_noise(torch.Generator().manual_seed(3)))
    assert torch.allclose(ours, expected.float(), atol=1e-4), (ours - expected).abs().max()


@pytest.mark.parametrize("sampler,order", [
    (sample_euler, 1), (sample_heun, 2), (sample_dpmpp_2m, 2), (sample_dpm_2, 2),
    (partial(sample_dpmpp_2s_ancestral, eta=0.0), 2), (sample_lms, 3), (partial(sample_dpmpp_sde, eta=0.0), 2),
    (sample_plms, 2),  # held to second order by its Heun start
    (partial(sample_unipc, order=2), 3), (partial(sample_unipc, order=2, variant="bh2"), 3),  # UniC adds one
])
def test_convergence_order_on_gaussian_data(sampler, order):
    torch.manual_seed(0)
    sigma_max, sigma_min = 14.6, 0.03
    x_t = torch.randn(1000, dtype=torch.float64) * math.sqrt(S**2 + sigma_max**2) + MU
    # exact ODE solution at sigma_min (no final jump to 0, whose error does not shrink with the step count)
    exact = MU + (x_t - MU) * math.sqrt(S**2 + sigma_min**2) / math.sqrt(S**2 + sigma_max**2)
    errors = []
    for n in (10, 20, 40):
        sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 1, dtype=torch.float64))
        errors.append((sampler(gaussian_x0, x_t, sigmas) - exact).abs().max().item())
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[2] < errors[0]
    assert min(rates) > order - 0.5, (errors, rates)


def test_denoiser_eps_and_v_and_cfg():
    abar = alphas_cumprod(make_betas("scaled_linear"))
    sched = DiscreteSigmas(abar)
    x0_true = torch.full((1, 4, 2, 2), 0.25)
    noise = torch.randn(1, 4, 2, 2)
    sigma = torch.tensor([2.0])

    def eps_unet(x, t, context, y):
        return noise.expand_as(x)

    def v_unet(x, t, context, y):  # v = alpha * eps - sigma_vp * x0 for the scaled input alpha * x
        s = sched.t_to_sigma(t).reshape(-1, 1, 1, 1)
        return ((noise - s * x0_true) / (s**2 + 1).sqrt()).expand_as(x)

    x = x0_true + sigma * noise
    assert torch.allclose(Denoiser(eps_unet, abar)(x, sigma), x0_true, atol=1e-5)
    assert torch.allclose(Denoiser(v_unet, abar, "v")(x, sigma), x0_true, atol=1e-4)
    calls = []

    def counting(x, s, context, y):
        calls.append(x.shape[0])
        return x * 0 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    cfg = CFGDenoiser(counting, torch.ones(1, 3, 2), torch.zeros(1, 3, 2), scale=7.5)
    out = cfg(torch.randn(1, 4, 2, 2), sigma)
    assert calls == [2] and torch.allclose(out, torch.full_like(out, 7.5))


def test_sampler_names():
    assert resolve_sampler("DPM++ 2M Karras") == ("DPM++ 2M", "karras")
    assert resolve_sampler("DPM++ 2M Karras", "Exponential") == ("DPM++ 2M", "exponential")
    assert resolve_sampler("Euler a") == ("Euler a", "uniform") and SAMPLERS["Euler a"].fn is sample_euler_ancestral
    assert resolve_sampler("DDIM", "") == ("DDIM", "ddim") and resolve_sampler("Euler", "ddim_uniform") == ("Euler", "ddim")
    with pytest.raises(ValueError, match="unknown scheduler"):
        resolve_sampler("Euler", "nope")
    with pytest.raises(ValueError, match="unknown sampler"):
        resolve_sampler("Magic")


def _vp_loop(scheduler, x_t, n, generator=None):
    """diffusers' DDIM/DDPM loop, in their x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps space."""
    scheduler.set_timesteps(n)
    abar = scheduler.alphas_cumprod
    sigmas = [((1 - abar[t]) / abar[t]).sqrt() for t in scheduler.timesteps]
    x = x_t * sigmas[0] / (sigmas[0] ** 2 + 1).sqrt()
    for sigma, t in zip(sigmas, scheduler.timesteps):
        x_ve = x * (sigma**2 + 1).sqrt()
        eps = (x_ve - gaussian_x0(x_ve, sigma)) / sigma
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x, torch.stack(sigmas + [torch.zeros(())]).float()


@pytest.mark.parametrize("kind", ["DDIM", "DDPM"])
def test_ddim_and_ddpm_match_diffusers(kind):
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8)
    if kind == "DDIM":
        expected, sigmas = _vp_loop(DDIMScheduler(**common, set_alpha_to_one=True, clip_sample=False), x_t, 12)
        ours = sample_ddim(gaussian_x0, x_t * sigmas[0], sigmas)
    else:
        scheduler = DDPMScheduler(**common, variance_type="fixed_small", clip_sample=False)
        expected, sigmas = _vp_loop(scheduler, x_t, 12, torch.Generator().manual_seed(5))
        ours = sample_ddpm(gaussian_x0, x_t * sigmas[0], sigmas, noise=default_noise(torch.Generator().manual_seed(5)))
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


@pytest.mark.parametrize("sampler", [sample_euler_ancestral, sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral,
                                     sample_dpmpp_2m_sde])
def test_ancestral_samplers_are_reproducible_and_land_near_the_data(sampler):
    torch.manual_seed(0)
    sigma_max = 14.6
    x_t = torch.randn(4000, dtype=torch.float64) * sigma_max
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(sigma_max), math.log(0.03), 30, dtype=torch.float64)),
                        torch.zeros(1, dtype=torch.float64)])
    runs = [sampler(gaussian_x0, x_t, sigmas, noise=default_noise(torch.Generator().manual_seed(1))) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # samples of N(MU, S^2): their mean and spread come out right (a stochastic sampler of the true posterior)
    assert abs(runs[0].mean().item() - MU) < 0.05 and abs(runs[0].std().item() - S) < 0.1


def test_lcm_jumps_to_x0_and_renoises():
    torch.manual_seed(0)
    x = torch.randn(2000, dtype=torch.float64) * 10
    sigmas = torch.tensor([10.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    seen = []
    out = sample_lcm(gaussian_x0, x, sigmas, noise=default_noise(torch.Generator().manual_seed(0)),
                     callback=lambda info: seen.append(info["x"].std().item()))
    # after the last jump the sample is the model's x0 prediction at sigma 0.5, which shrinks towards MU
    assert len(seen) == 3 and abs(out.mean().item() - MU) < 0.05
    assert out.std().item() < S  # a posterior mean is narrower than the data

"""The diffusion loss's per-timestep weightings (none, Min-SNR-gamma, truncated SNR) for eps and v targets."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from stable_diffusion.diffusion.schedules import alphas_cumprod, make_betas
from stable_diffusion.pipeline import Pipeline
from stable_diffusion.training.config import parse_config
from stable_diffusion.training.objectives import DiffusionLoss, snr_loss_weights

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
ABAR = alphas_cumprod(make_betas("scaled_linear", 1000, 0.00085, 0.012)).float()


def test_weightings_follow_their_formulas_and_average_one():
    inverse_snr = (1 - ABAR) / ABAR
    for name in ("none", "min_snr", "truncated_snr"):
        assert snr_loss_weights(ABAR, name).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(snr_loss_weights(ABAR, "none"), torch.ones(1000))
    min_snr = torch.minimum(torch.ones(1000), 5.0 * inverse_snr)
    torch.testing.assert_close(snr_loss_weights(ABAR, "min_snr", gamma=5.0), min_snr / min_snr.mean())
    truncated = snr_loss_weights(ABAR, "truncated_snr", cap=10.0)
    # flat (eps-like) at the clean end, growing like sigma^2 in between, capped at 10x on the noisy end
    assert truncated[0] == truncated[50] and truncated[-1] == truncated[-100]
    assert (truncated[-1] / truncated[0]).item() == pytest.approx(10.0, rel=1e-5)
    middle = (inverse_snr > 1.5) & (inverse_snr < 9)
    torch.testing.assert_close(truncated[middle] / truncated[0], inverse_snr[middle])
    # a floor below 1: max(SNR, floor) on the x0 error, i.e. floor * sigma^2 on the noise error once above 1
    floored = snr_loss_weights(ABAR, "truncated_snr", floor=0.2)
    noisy = 0.2 * inverse_snr > 1
    torch.testing.assert_close(floored[noisy] / floored[0], 0.2 * inverse_snr[noisy])
    assert torch.equal(floored[~noisy], torch.full_like(floored[~noisy], floored[0].item()))
    with pytest.raises(ValueError, match="unknown loss weighting"):
        snr_loss_weights(ABAR, "p2")
    with pytest.raises(ValueError, match="loss_weighting must be"):
        parse_config({"diffusion": {"loss_weighting": "p2"}})


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weighting", ["none", "truncated_snr"])
def test_weighted_loss_is_the_weighted_noise_error(prediction, weighting):
    config = parse_config(tomllib.loads(SMOKE.read_text())).model_config()
    torch.manual_seed(0)
    pipe = Pipeline.from_config(config)
    loss = DiffusionLoss(pipe.unet, pipe.text_encoder, ABAR, prediction, False, weighting, snr_weight_cap=10.0)
    latents = torch.randn(4, config.unet.in_channels, 8, 8)
    ids = pipe.tokenizer(["a red circle", "", "a blue star", "a ring"])
    with torch.no_grad():
        value = loss(latents, ids, torch.Generator().manual_seed(7))
        # the same draws by hand
        generator = torch.Generator().manual_seed(7)
        t = torch.randint(0, 1000, (4,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        a = ABAR[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        output = pipe.unet(x_t, t, pipe.text_encoder(ids)[0])
    if weighting == "none":  # plain MSE on the network's own target
        target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * latents
        expected = (output - target).pow(2).mean()
    else:  # the error on the noise, however the network predicts it, weighted per timestep
        eps_hat = output if prediction == "eps" else (1 - a).sqrt() * x_t + a.sqrt() * output
        weights = snr_loss_weights(ABAR, "truncated_snr", cap=10.0)[t]
        expected = (weights * (eps_hat - noise).pow(2).flatten(1).mean(1)).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)

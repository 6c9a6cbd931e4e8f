"""The diffusion loss's per-timestep weightings (none, Min-SNR-gamma, truncated SNR) for eps and v targets, and
its per-caption weights."""
from __future__ import annotations

import tomllib

import pytest
import torch

from stable_diffusion.diffusion.schedules import alphas_cumprod, make_betas
from stable_diffusion.pipeline import Pipeline
from stable_diffusion.training.config import parse_config
from stable_diffusion.training.data import make_batch
from stable_diffusion.training.objectives import DiffusionLoss, caption_loss_weights, snr_loss_weights
from stable_diffusion.training.train import Trainer

from .helpers import SMOKE

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
    with pytest.raises(ValueError, match=r"\[diffusion\] loss_weighting: Input should be 'none', 'min_snr'"):
        parse_config({"diffusion": {"loss_weighting": "p2"}})


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weighting", ["none", "truncated_snr"])
def test_weighted_loss_is_the_weighted_noise_error(prediction, weighting):
    config = parse_config(tomllib.loads(SMOKE.read_text())).new_model_config()
    torch.manual_seed(0)
    pipe = Pipeline.from_config(config)
    loss = DiffusionLoss(pipe.unet, [pipe.text_encoder], ABAR, prediction, False, weighting, snr_weight_cap=10.0)
    latents = torch.randn(4, config.unet.in_channels, 8, 8)
    ids = pipe.tokenizer(["a red circle", "", "a blue star", "a ring"])
    with torch.no_grad():
        value = loss(latents, ids[None], torch.Generator().manual_seed(7))
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


def test_caption_weights_match_whole_words_and_take_the_largest():
    weights = {"small": 3.0, "blue square": 2.0, "Star": 1.5}
    captions = ["a small red circle", "a smaller circle", "A BLUE SQUARE on the left", "a blue squares", "",
                "a small blue square", "a star", "a starfish"]
    expected = [3.0, 1.0, 2.0, 1.0, 1.0, 3.0, 1.5, 1.0]
    assert caption_loss_weights(captions, weights).tolist() == expected
    assert caption_loss_weights(captions, {}).tolist() == [1.0] * len(captions)
    for bad in ({"small": 0}, {"small": -1.0}, {"small": "2"}, {" ": 2.0}, {"small": True}):
        with pytest.raises(ValueError, match="caption_weights"):
            parse_config({"diffusion": {"caption_weights": bad}})


@pytest.mark.parametrize("weighting", ["none", "truncated_snr"])
def test_caption_weighted_loss_is_the_weighted_mean_of_the_sample_losses(weighting):
    config = parse_config(tomllib.loads(SMOKE.read_text())).new_model_config()
    torch.manual_seed(0)
    pipe = Pipeline.from_config(config)
    loss = DiffusionLoss(pipe.unet, [pipe.text_encoder], ABAR, "v", False, weighting, snr_floor=0.2)
    latents = torch.randn(3, config.unet.in_channels, 8, 8)
    ids = pipe.tokenizer(["a small red circle", "a blue star", ""])

    def value(weights=None):  # the same timesteps and noise every call
        with torch.no_grad():
            return loss(latents, ids[None], torch.Generator().manual_seed(3), weights).item()

    each = [value(torch.eye(3)[i]) for i in range(3)]  # one-hot weights pick one sample's loss
    assert value() == pytest.approx(sum(each) / 3, rel=1e-5)
    assert value(torch.full((3,), 4.0)) == pytest.approx(value(), rel=1e-5)
    assert value(torch.tensor([3.0, 1.0, 1.0])) == pytest.approx((3 * each[0] + each[1] + each[2]) / 5, rel=1e-5)
    assert len({round(v, 6) for v in each}) == 3  # the samples' losses differ, so the weights matter


def test_the_unet_batch_carries_caption_weights_only_when_configured(tmp_path):
    data = tomllib.loads(SMOKE.read_text())
    data["train"]["save_path"] = str(tmp_path / "run")
    assert len(Trainer(parse_config(data), progress=False)._latent_batch(8)(0, 0)) == 3
    data["diffusion"]["caption_weights"] = {"small": 2.5}
    config = parse_config(data)
    latents, ids, generator, weights = Trainer(config, progress=False)._latent_batch(8)(0, 0)
    captions = make_batch(config.data, None, 0, 8, 0, 1)[1]
    assert weights.tolist() == [2.5 if "small" in c.replace(",", " ").split() else 1.0 for c in captions]
    assert 2.5 in weights.tolist() and 1.0 in weights.tolist()

"""Each loss term equals a hand computation on a tiny case."""
import math

import pytest
import torch

from cpsl.config import LossConfig
from cpsl.losses import aux_loss, diversity_loss, ramp, rec_loss, statistical_loss, task_loss, total_loss
from cpsl.model.cpsl import ModelOutput


def test_task_losses_by_hand():
    p, y = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    assert task_loss(p, y, "l1").item() == pytest.approx((1 + 2 + 0) / 3)
    assert task_loss(p, y, "mse").item() == pytest.approx((1 + 4 + 0) / 3)
    # smooth L1 (β=1): |d|<1 → d²/2, else |d|−1/2: 0.5, 1.5, 0
    assert task_loss(p, y, "smoothl1").item() == pytest.approx((0.5 + 1.5 + 0) / 3)


def test_aux_loss_is_mean_over_modalities():
    y = torch.tensor([1.0, 2.0])
    aux = {"text": torch.tensor([1.0, 2.0]), "audio": torch.tensor([0.0, 0.0])}
    # text: 0; audio: (1 + 2)/2 = 1.5 → mean 0.75
    assert aux_loss(aux, y).item() == pytest.approx(0.75)


def test_rec_loss_by_hand():
    rec = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[0.0]])}
    tgt = {"a": torch.tensor([[0.0, 0.0]]), "b": torch.tensor([[3.0]])}
    # a: (1 + 4)/2 = 2.5; b: 9 → mean 5.75
    assert rec_loss(rec, tgt).item() == pytest.approx(5.75)


def test_statistical_loss_by_hand():
    mu_hat = {"a": torch.tensor([[1.0, 0.0]])}
    log_sig_hat = {"a": torch.tensor([[0.0, 0.0]])}
    mu = {"a": torch.tensor([[0.0, 0.0]])}
    sigma = {"a": torch.tensor([[math.e - 1e-4, 1.0 - 1e-4]])}     # log(σ + ε) = [1, 0]
    pred, y = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    # per-modality: MSE(μ̂, μ) = (1 + 0)/2 = 0.5 ; MSE(log σ̂, log(σ+ε)) = (1 + 0)/2 = 0.5
    # output term: (mean 2 − 0)² + (std 1 − 0)² = 5 ; λ_out = 0.1 → 0.5
    val = statistical_loss(mu_hat, log_sig_hat, mu, sigma, pred, y, lambda_out=0.1, eps=1e-4)
    assert val.item() == pytest.approx(0.5 + 0.5 + 0.5, rel=1e-5)


def test_diversity_loss_by_hand():
    # batch of 2; centring gives ±(v/2): cos between centred reps is ±1 (collinear) → cos² = 1
    h = {"a": torch.tensor([[1.0, 0.0], [3.0, 0.0]]), "b": torch.tensor([[0.0, 5.0], [0.0, 1.0]]),
         "c": torch.tensor([[2.0, 2.0], [0.0, 0.0]])}
    # centred: a = ±(1, 0); b = ±(0, 2) (sign flipped); c = ±(1, 1)
    # cos²(a,b) = 0; cos²(a,c) = 1/2; cos²(b,c) = 1/2 → mean over the 3 pairs = 1/3
    assert diversity_loss(h).item() == pytest.approx(1 / 3, rel=1e-5)


def test_ramp():
    assert [ramp(e, 3) for e in range(5)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0]
    assert ramp(0, 0) == 1.0


def _out(pred, aux):
    z = torch.zeros(len(pred), 2)
    one = {m: torch.zeros(len(pred), 1) for m in aux}
    return ModelOutput(pred, aux, one, one, {m: torch.ones(len(pred), 1) for m in aux}, one, one,
                       {m: torch.randn(len(pred), 2) for m in aux}, z)


def test_total_loss_weights_and_ramp():
    torch.manual_seed(0)
    y = torch.tensor([0.0, 1.0, -1.0])
    out = _out(torch.tensor([0.5, 0.5, 0.5]), {"a": torch.zeros(3), "b": torch.ones(3)})
    cfg = LossConfig(aux=0.1, rec=0.2, sl=0.05, div=0.01, warmup_epochs=2)
    for epoch, r in ((0, 0.0), (1, 0.5), (5, 1.0)):
        total, t = total_loss(out, y, cfg, epoch)
        expect = t["task"] + 0.1 * t["aux"] + 0.2 * t["rec"] + r * (0.05 * t["sl"] + 0.01 * t["div"])
        assert total.item() == pytest.approx(expect.item(), rel=1e-6)
    assert set(t) >= {"task", "aux", "rec", "sl", "div", "aux_a", "aux_b"}
    cfg0 = LossConfig(aux=0, rec=0, sl=0, div=0)
    total, t = total_loss(out, y, cfg0, 3)
    assert set(t) == {"task", "aux_a", "aux_b"} and total.item() == pytest.approx(t["task"].item())

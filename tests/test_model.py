"""CPSL model: shapes for two and three modalities, padding invariance, gradient flow, ablations."""
import numpy as np
import pytest
import torch

from cpsl.config import Config
from cpsl.data.batch import make_batch
from cpsl.data.synthetic import SynthSpec, generate
from cpsl.losses import total_loss
from cpsl.model import CPSLModel, ExportWrapper


def small_cfg(**model):
    cfg = Config()
    cfg.model.d, cfg.model.heads = 16, 2
    cfg.model.audio_layers = cfg.model.vision_layers = 1
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.fixture(scope="module")
def data():
    return generate(SynthSpec(n_train=24, n_valid=8, n_test=8, d_text=12, d_audio=5, d_vision=7))


def batch_for(data, mods, n=6):
    b = make_batch(data["train"], np.arange(n), mods)
    return b


@pytest.mark.parametrize("mods", [("text", "audio", "vision"), ("text", "audio"), ("audio", "vision")])
@pytest.mark.parametrize("fusion", ["gcf", "concat"])
@pytest.mark.parametrize("ame", [True, False])
def test_output_shapes(data, mods, fusion, ame):
    torch.manual_seed(0)
    dims = {m: data.dims[m] for m in mods}
    model = CPSLModel(dims, small_cfg(fusion=fusion, ame=ame).model)
    assert model.modalities == mods
    b = batch_for(data, mods)
    out = model(b.x, b.mask)
    B = len(b)
    assert out.pred.shape == (B,)
    assert out.z.shape == (B, 16)
    for m in mods:
        assert out.aux[m].shape == (B,)
        assert out.h[m].shape == (B, 16)
        assert out.rec[m].shape == (B, dims[m])
        assert out.mu[m].shape == out.sigma[m].shape == out.mu_hat[m].shape == (B, dims[m])
        assert out.log_sigma_hat[m].shape == (B, dims[m])
    assert set(model.modality_parameters()) == set(mods)


def test_utterance_level_inputs_work():
    torch.manual_seed(0)
    model = CPSLModel({"text": 4, "audio": 3}, small_cfg().model).eval()
    x = {"text": torch.randn(5, 1, 4), "audio": torch.randn(5, 1, 3)}
    mask = {m: torch.ones(5, 1, dtype=torch.bool) for m in x}
    assert model(x, mask).pred.shape == (5,)


@pytest.mark.parametrize("ame", [True, False])
def test_padding_invariance(data, ame):
    """Extra padding (with junk in it) leaves every output unchanged, in eval and train mode."""
    torch.manual_seed(0)
    model = CPSLModel(data.dims, small_cfg(ame=ame, dropout=0.0).model)
    b = batch_for(data, None)
    x2 = {m: torch.cat([v, 50 * torch.randn(v.shape[0], 9, v.shape[2])], 1) for m, v in b.x.items()}
    m2 = {m: torch.cat([v, torch.zeros(v.shape[0], 9, dtype=torch.bool)], 1) for m, v in b.mask.items()}
    for train_mode in (False, True):
        model.train(train_mode)
        a, c = model(b.x, b.mask), model(x2, m2)
        torch.testing.assert_close(a.pred, c.pred, atol=1e-5, rtol=1e-5)
        for m in model.modalities:
            torch.testing.assert_close(a.h[m], c.h[m], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.sigma[m], c.sigma[m], atol=1e-5, rtol=1e-5)


def test_batch_composition_does_not_change_eval_predictions(data):
    torch.manual_seed(0)
    model = CPSLModel(data.dims, small_cfg().model).eval()
    full = model(*[batch_for(data, None, 6).__dict__[k] for k in ("x", "mask")]).pred
    one = make_batch(data["train"], np.array([3]))
    torch.testing.assert_close(model(one.x, one.mask).pred, full[3:4], atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_learning_parameter(data):
    torch.manual_seed(0)
    cfg = small_cfg()
    model = CPSLModel(data.dims, cfg.model).train()
    b = batch_for(data, None, 8)
    loss, _ = total_loss(model(b.x, b.mask), b.y, cfg.loss, epoch=cfg.loss.warmup_epochs)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reaches: {missing}"


def test_rec_and_sl_targets_are_stop_gradient(data):
    """sg(x̄_m), sg(μ_m), sg(log σ_m): with the predictions detached, nothing can backpropagate."""
    torch.manual_seed(0)
    model = CPSLModel(data.dims, small_cfg().model).train()
    b = batch_for(data, None, 8)
    out = model(b.x, b.mask)
    assert out.mu["text"].requires_grad  # the statistics themselves depend on parameters...
    from cpsl.losses import rec_loss, statistical_loss
    det = lambda d: {m: v.detach() for m, v in d.items()}  # noqa: E731
    # ...but the losses only learn through the predicted side
    assert not rec_loss(det(out.rec), out.mu).requires_grad
    sl = statistical_loss(det(out.mu_hat), det(out.log_sigma_hat), out.mu, out.sigma, out.pred.detach(), b.y)
    assert not sl.requires_grad


def test_modality_parameters_default_groups_are_the_encoders(data):
    model = CPSLModel(data.dims, small_cfg().model)
    groups = model.modality_parameters()
    enc = {m: {id(p) for p in model.encoders[m].parameters()} for m in model.modalities}
    for m, ps in groups.items():
        assert {id(p) for p in ps} == enc[m]
    custom = model.modality_parameters({"text": ["encoders.text.", "aux_heads.text."]})
    assert len(custom["text"]) == len(list(model.encoders["text"].parameters())) + len(list(model.aux_heads["text"].parameters()))


def test_export_wrapper_matches_predict(data):
    torch.manual_seed(0)
    model = CPSLModel(data.dims, small_cfg().model).eval()
    b = batch_for(data, None)
    args = []
    for m in model.modalities:
        args += [b.x[m], b.mask[m].float()]
    torch.testing.assert_close(ExportWrapper(model)(*args), model.predict(b.x, b.mask))
    torch.testing.assert_close(model.predict(b.x, b.mask), model(b.x, b.mask).pred)

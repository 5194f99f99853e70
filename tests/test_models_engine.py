"""Models, losses and the training engine: behaviour a user relies on."""

import inspect
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from fixtures import toy_images
from imgclf import checkpoint, config
from imgclf.config import Augment, CNNConfig, MLPConfig, TrainConfig
from imgclf.engine import Plan, fit, make_loss, make_optimizer, make_schedule, predict
from imgclf.errors import DataError, TrainingError
from imgclf.models import CNN, MLP, MODULES, Classifier, build_model, count_parameters
from imgclf.runtime import configure, resolve_device
from imgclf.transforms import Normalizer, augment

MLP_CFG = MLPConfig(arch="mlp", hidden=[32, 16], dropout=0.1)
CNN_CFG = CNNConfig(arch="cnn", channels=[4, 8], hidden=16, dropout=0.1)
# Fashion-MNIST's policy: shifts of up to 2 pixels and horizontal flips.
SHIFT_AND_FLIP = Augment(shift=2, flip=True)
# The CPU always, and what `train.device: auto` picks when that is another (a GPU): the same
# tests run on each, so the device path is the code path these tests prove.
DEVICES = sorted({"cpu", resolve_device("auto").type})


def _train_cfg(**kw):
    base = dict(seed=0, epochs=2, batch_size=16, optimizer="sgd", lr=0.05, augment=True, label_smoothing=0.1)
    return TrainConfig(**{**base, **kw})


# Every model of the shipped params.yaml, so every architecture a user can pick is built below.
SHIPPED = {name: config.load_model(name) for name in config.model_names()}


def test_every_architecture_has_a_module_and_a_shipped_example():
    # A config class alone registers an architecture; without its @builds module, or without a
    # key in params.yaml using it, nothing below would ever build it.
    assert set(MODULES) == set(config.ARCHITECTURES)
    assert {cfg.arch for cfg in SHIPPED.values()} == set(config.ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(config.ARCHITECTURES))
def test_module_takes_exactly_its_configs_fields(arch):
    fields = set(config.ARCHITECTURES[arch].model_fields) - {"arch", "train"}
    params = set(inspect.signature(MODULES[arch]).parameters)
    assert params == fields | {"in_shape", "num_classes", "log_probs"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("log_probs", [False, True])
def test_forward_shape_and_finite(name, shape, log_probs):
    model = build_model(SHIPPED[name], shape, 10, log_probs=log_probs).eval()
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    if log_probs:
        assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)


def test_mlp_sees_a_vector_cnn_sees_a_grid():
    # The MLP's first layer connects every pixel to every unit; the CNN's shares 3x3 filters.
    mlp, cnn = MLP((1, 28, 28), 10, [64]), CNN((1, 28, 28), 10, [8], hidden=64)
    assert mlp.net[1].weight.shape == (64, 784)
    assert cnn.features[0].weight.shape == (8, 1, 3, 3)
    assert count_parameters(MLP((1, 28, 28), 10, [512, 256])) == 784 * 512 + 512 + 512 * 256 + 256 + 2570


def test_cnn_refuses_more_pooling_than_the_image_allows():
    with pytest.raises(ValueError, match="shrink a 8x8 image to nothing"):
        CNN((1, 8, 8), 10, [4, 4, 4, 4], hidden=8)


@pytest.mark.parametrize("kind", config.LOSSES)
def test_every_allowed_loss_trains(kind):
    # train.loss accepts exactly config.LOSSES: each must have an implementation whose gradient flows.
    out = torch.randn(8, 4).requires_grad_()
    model_out = torch.log_softmax(out, dim=1) if kind == "nll" else out
    loss = make_loss(kind, 0.1)(model_out, torch.randint(0, 4, (8,)))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and out.grad.abs().sum() > 0


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_equals_log_softmax_plus_nll(smoothing):
    logits = torch.randn(64, 10, dtype=torch.float64)
    target = torch.randint(0, 10, (64,))
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss_ce = make_loss("cross_entropy", smoothing)(a, target)
    loss_nll = make_loss("nll", smoothing)(torch.log_softmax(b, dim=1), target)
    loss_ce.backward()
    loss_nll.backward()
    assert torch.allclose(loss_ce, loss_nll, atol=1e-12)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)
    assert torch.allclose(loss_ce, F.cross_entropy(logits, target, label_smoothing=smoothing))


def test_augment_shifts_and_flips_each_image_independently():
    g = torch.Generator().manual_seed(0)
    pixels = torch.zeros(256, 1, 28, 28, dtype=torch.uint8)
    pixels[:, :, 10:18, 12:16] = 200  # an 8x4 bright block, away from the borders
    out = augment(pixels, g, SHIFT_AND_FLIP)
    assert out.shape == pixels.shape and out.dtype == torch.uint8
    # A shift of <= 2 pixels keeps the whole block inside the image: nothing is lost.
    assert torch.equal(out.sum(dim=(1, 2, 3)), pixels.sum(dim=(1, 2, 3)))
    positions = {tuple(torch.nonzero(img[0])[0].tolist()) for img in out}
    assert len(positions) > 10  # per-image parameters, not one per batch


def test_onecycle_schedule_end_points():
    model = torch.nn.Linear(2, 2)
    cfg = _train_cfg(lr=0.4, warmup_fraction=0.25)
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg, steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.4 / 25)
    assert max(lrs) == pytest.approx(0.4, rel=1e-3) and lrs.index(max(lrs)) in (24, 25)
    assert lrs[-1] < 0.4 / 500




def _fit(cfg, model_cfg=CNN_CFG, improvements=None, device="cpu"):
    # As the train stage does it: deterministic settings first, the data and the model on the device.
    configure(cfg.seed, torch.get_num_threads(), cfg.deterministic)
    model = build_model(model_cfg, (1, 12, 12), 4, log_probs=cfg.loss == "nll").to(device)
    x, y = (t.to(device) for t in toy_images())
    vx, vy = (t.to(device) for t in toy_images(32, seed=1))
    plan = Plan(cfg, Normalizer([0.2], [0.3]).to(device), augment=SHIFT_AND_FLIP if cfg.augment else None,
                eval_batch_size=64)
    hist = fit(model, (x, y), (vx, vy), plan,
               on_improve=lambda r: improvements.append(r.epoch) if improvements is not None else None)
    return model, hist


@pytest.mark.parametrize("device", DEVICES)
def test_training_learns_and_saves_on_every_val_improvement(device):
    saved = []
    model, hist = _fit(_train_cfg(epochs=6, augment=False), improvements=saved, device=device)
    val_losses = [r.val["loss"] for r in hist]
    expected = [r.epoch for i, r in enumerate(hist) if r.val["loss"] < min(val_losses[:i], default=math.inf)]
    assert saved == expected and saved[0] == 1
    assert hist[-1].val["accuracy"] > 0.5  # 4 classes: chance is 0.25


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_weights_bitwise(device):
    a, _ = _fit(_train_cfg(), device=device)
    b, _ = _fit(_train_cfg(), device=device)
    c, _ = _fit(_train_cfg(seed=1), device=device)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_diverging_loss_stops_with_epoch_batch_and_lr():
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at epoch 1, batch \d+ \(lr "):
        _fit(_train_cfg(lr=1e30, optimizer="sgd", momentum=0.0, label_smoothing=0.0), model_cfg=MLP_CFG)


def test_bf16_and_fp32_agree_within_tolerance():
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no native bf16")  # the fp32 path is covered by every other test
    torch.manual_seed(0)
    model = build_model(CNN_CFG, (1, 28, 28), 10, log_probs=False).eval()
    x = torch.randn(32, 1, 28, 28)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    assert (ref.argmax(1) == low.argmax(1)).float().mean() >= 0.9
    assert torch.allclose(torch.softmax(ref, 1), torch.softmax(low, 1), atol=0.05)


def test_checkpoint_round_trip_and_architecture_check(tmp_path):
    model = build_model(CNN_CFG, (1, 28, 28), 10, log_probs=False)
    meta = {"shape": [1, 28, 28], "classes": [str(i) for i in range(10)], "mean": [0.3], "std": [0.3]}
    path = tmp_path / "model.pt"
    checkpoint.save(path, model, cfg=CNN_CFG, meta=meta, loss="cross_entropy", extra={"epoch": 1})
    loaded, state = checkpoint.load(path, CNN_CFG)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded(x))
    other = CNNConfig(arch="cnn", channels=[4, 16], hidden=16)
    with pytest.raises(DataError, match="params.yaml now says"):
        checkpoint.load(path, other)


class _Evil:
    def __reduce__(self):
        return (exec, ("open('/tmp/imgclf-pwned', 'w').write('x')",))


def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": 1, "payload": _Evil()}, path)
    with pytest.raises(DataError, match="refused to load"):
        checkpoint.load(path)
    bad = tmp_path / "plain.pt"
    bad.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DataError):
        checkpoint.load(bad)


def test_classifier_takes_raw_pixels_and_returns_probabilities():
    model = build_model(MLP_CFG, (1, 28, 28), 10, log_probs=True).eval()
    clf = Classifier(model, [0.5], [0.25]).eval()
    pixels = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    probs = clf(pixels)
    expected = model((pixels.float() / 255 - 0.5) / 0.25).exp()
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-6)


def test_checkpoint_bytes_do_not_depend_on_when_or_where_saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(MLP_CFG, (1, 28, 28), 10, log_probs=False)
    meta = {"shape": [1, 28, 28], "classes": [str(i) for i in range(10)], "mean": [0.3], "std": [0.3]}
    for path in (tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt"):
        checkpoint.save(path, model, cfg=MLP_CFG, meta=meta, loss="nll", extra={})
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


def test_a_model_trained_on_flips_is_judged_on_both_views_and_one_trained_without_on_one():
    cfg = _train_cfg()
    norm = Normalizer([0.2], [0.3])
    assert Plan(cfg, norm, augment=SHIFT_AND_FLIP, eval_batch_size=64).flip_average
    assert not Plan(cfg, norm, augment=Augment(shift=2, flip=False), eval_batch_size=64).flip_average  # digits
    assert not Plan(cfg, norm, augment=None, eval_batch_size=64).flip_average  # train.augment false
    torch.manual_seed(0)
    model = build_model(CNN_CFG, (1, 28, 28), 10, log_probs=False).eval()
    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    x = (pixels.float() / 255 - 0.5) / 0.25
    expected = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1)) / 2
    with torch.inference_mode():
        averaged = Classifier(model, [0.5], [0.25], flip_average=True)(pixels)
        plain = Classifier(model, [0.5], [0.25])(pixels)
        # What the evaluate stage computes: the same probabilities, as log-probabilities.
        logged = predict(model, pixels, normalize=Normalizer([0.5], [0.25]), batch_size=3, precision="fp32",
                         flip_average=True)
    assert torch.allclose(averaged, expected, atol=1e-6) and not torch.allclose(averaged, plain, atol=1e-4)
    assert torch.allclose(logged.exp(), expected, atol=1e-6)
    assert torch.allclose(averaged.sum(1), torch.ones(4), atol=1e-6)
    # A mirror-symmetric image gets what one view gives.
    symmetric = torch.cat([pixels[..., :14], pixels[..., :14].flip(-1)], dim=-1)
    with torch.inference_mode():
        assert torch.allclose(Classifier(model, [0.5], [0.25], flip_average=True)(symmetric),
                              Classifier(model, [0.5], [0.25])(symmetric), atol=1e-6)


def test_the_checkpoint_says_whether_its_model_is_flip_averaged(tmp_path):
    model = build_model(CNN_CFG, (1, 28, 28), 10, log_probs=False)
    meta = {"shape": [1, 28, 28], "classes": [str(i) for i in range(10)], "mean": [0.3], "std": [0.3]}
    path = tmp_path / "model.pt"
    for extra, expected in (({"flip_average": True}, True), ({}, False)):  # absent: saved before it existed
        checkpoint.save(path, model, cfg=CNN_CFG, meta=meta, loss="cross_entropy", extra=extra)
        assert Classifier.from_checkpoint(*checkpoint.load(path)).flip_average is expected
    checkpoint.save(path, model, cfg=CNN_CFG, meta=meta, loss="cross_entropy", extra={"flip_average": "yes"})
    with pytest.raises(DataError, match=r"not a usable checkpoint \(flip_average is not true or false\)"):
        checkpoint.load(path)

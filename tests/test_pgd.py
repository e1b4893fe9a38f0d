"""White-box attack checks: PGD/FGSM budgets and clipping, attack strength on a trained classifier,
output conventions, eval mode, losses and restarts, determinism, and the sanity checks (a clean
model passes, gradient-masking models are flagged)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

from ctharden.attacks import (
    AttackError,
    fgsm,
    pgd,
    predict_broken,
    robust_accuracy_curve,
    run_sanity_checks,
)
from ctharden.attacks.sanity import CHECKS
from ctharden.core.errors import ConfigError
from ctharden.models import CTClassifier, build_model, predicted_label

SIDE = 16


# ---------------------------------------------------------------------------------------------------
# data and models


def blobs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Separable (N, 1, 16, 16) images in [0, 1]: a bright (y = 1) or dark (y = 0) central blob of
    random amplitude 0.05-0.30 on a noisy grey background, so the margins spread out."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    axis = torch.arange(SIDE, dtype=torch.float32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    blob = torch.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / (2 * 3.0**2))
    amp = (0.05 + 0.25 * torch.rand(n, generator=g)) * (2 * y - 1)
    x = 0.5 + 0.05 * torch.randn(n, 1, SIDE, SIDE, generator=g) + amp[:, None, None, None] * blob
    return x.clamp(0, 1), y


class TinyCNN(nn.Module):
    """(N, 1, 16, 16) -> binary logit (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(1)


class Column(nn.Module):
    """The same classifier with a ``(N, 1)`` output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, None]


class TwoLogits(nn.Module):
    """The same classifier as two logits ``(-z/2, z/2)``: softmax CE = BCE(z), margin = ±z."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)
        return torch.stack([-z / 2, z / 2], dim=1)


class RoundingLayer(nn.Module):
    """x -> round(8x)/8 in front of a classifier: zero gradient almost everywhere (masking)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(torch.round(x * 8) / 8)


class SignFront(nn.Module):
    """A binarising step front (torch.sign): non-differentiable, zero gradient."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(0.5 + 0.15 * torch.sign(x - 0.5))


@pytest.fixture(scope="module")
def trained() -> TinyCNN:
    """A tiny CNN trained on the separable blobs (clean test accuracy 100 %)."""
    torch.manual_seed(0)
    x, y = blobs(256, seed=0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def test_set() -> tuple[Tensor, Tensor]:
    return blobs(48, seed=1)


def _norms(d: Tensor, norm: str) -> Tensor:
    f = d.flatten(1)
    return f.abs().amax(1) if norm == "linf" else f.norm(dim=1)


# ---------------------------------------------------------------------------------------------------
# budgets and clipping


SHAPES = {"2d": (6, 1, SIDE, SIDE), "3d": (6, SIDE, SIDE, SIDE)}


def _untrained(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "3d":
        return build_model("nodule3d", width=4)  # CTClassifier, (N, 16, 16, 16) in [0, 1]
    return TinyCNN()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("clip", [(0.0, 1.0), None], ids=["clip", "noclip"])
def test_budget_and_clip(norm: str, kind: str, clip: tuple[float, float] | None) -> None:
    model = _untrained(kind)
    torch.manual_seed(1)
    x = torch.rand(SHAPES[kind])
    x[0] = 0.0  # corners of the range: clipping must bite here
    x[1] = 1.0
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    big = 0.3 if norm == "linf" else 3.0
    per_sample = torch.tensor([big, big, 0.0, big / 10, big / 3, big])
    for eps in (big, per_sample):
        for attack in ("pgd", "fgsm"):
            if attack == "pgd":
                x_adv, broken = pgd(model, x, y, eps, norm=norm, steps=5, clip=clip, loss="both")
            else:
                x_adv, broken = fgsm(model, x, y, eps, norm=norm, clip=clip)
            assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
            assert broken.shape == (6,) and broken.dtype == torch.bool
            budget = torch.as_tensor(eps).expand(6)
            assert (_norms(x_adv - x, norm) <= budget + 1e-6).all()
            if clip is not None:
                assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
            assert torch.equal(broken, predict_broken(model, x_adv, y))
        assert torch.equal(x_adv[2], x[2]) or not isinstance(eps, Tensor)  # ε = 0: untouched
    if clip is None:  # without clipping the corner samples leave [0, 1]
        x_adv, _ = pgd(model, x, y, big, norm=norm, steps=5, clip=None)
        assert x_adv[:2].min() < 0.0 or x_adv[:2].max() > 1.0


def test_per_sample_eps_is_used_per_sample(trained: TinyCNN, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    eps = torch.where(torch.arange(len(y)) % 2 == 0, 0.5, 0.0)
    x_adv, broken = pgd(trained, x, y, eps, steps=20)
    assert broken[eps == 0.5].all() and not broken[eps == 0].any()
    assert torch.equal(x_adv[eps == 0], x[eps == 0])
    x_adv, broken = pgd(trained, x, y, eps, steps=20, batch_size=10)  # in chunks: same guarantees
    assert broken[eps == 0.5].all() and not broken[eps == 0].any()
    assert torch.equal(x_adv[eps == 0], x[eps == 0])


# ---------------------------------------------------------------------------------------------------
# strength


@pytest.mark.parametrize(("norm", "large"), [("linf", 0.5), ("l2", 8.0)])
def test_pgd_breaks_an_undefended_model(
    trained: TinyCNN, test_set: tuple[Tensor, Tensor], norm: str, large: float
) -> None:
    x, y = test_set
    torch.manual_seed(0)
    _, clean = pgd(trained, x, y, 0.0, norm=norm, steps=10)
    _, at_large = pgd(trained, x, y, large, norm=norm, steps=100)
    assert clean.float().mean() == 0.0  # ε = 0: only clean errors, and there are none
    assert at_large.float().mean() >= 0.95  # measured: 1.0 for both norms
    eps_list = [large / 8, large / 4, large]
    curve = robust_accuracy_curve(trained, x, y, eps_list, norm=norm, steps=50, loss="both")
    acc = curve["accuracy"]
    assert curve["eps"][0] == 0.0 and acc[0] == 1.0 and acc[-1] <= 0.05
    assert all(b <= a for a, b in zip(acc, acc[1:], strict=False))
    eps = curve["eps"]
    trapezoid = sum((e1 - e0) * (a0 + a1) / 2 for e0, e1, a0, a1 in zip(eps, eps[1:], acc, acc[1:], strict=False))
    assert curve["auc"] == pytest.approx(trapezoid / large)


def test_pgd_at_least_as_strong_as_fgsm(trained: TinyCNN, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    torch.manual_seed(0)
    for norm, eps in (("linf", 0.04), ("l2", 0.8)):
        _, by_pgd = pgd(trained, x, y, eps, norm=norm, loss="both")
        _, by_fgsm = fgsm(trained, x, y, eps, norm=norm, loss="both")
        assert not (by_fgsm & ~by_pgd).any()
        assert 0 < by_fgsm.sum() <= by_pgd.sum() < len(y)


# ---------------------------------------------------------------------------------------------------
# output conventions and model state


def test_binary_column_and_two_logit_outputs_agree(trained: TinyCNN, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    results = []
    for model in (trained, Column(trained), TwoLogits(trained)):
        torch.manual_seed(3)
        results.append(pgd(model, x, y, 0.04, steps=30, loss="both"))
    broken = [b for _, b in results]
    assert 0 < broken[0].sum() < len(y)
    assert torch.equal(broken[0], broken[1]) and torch.equal(broken[0], broken[2])
    assert torch.allclose(results[0][0], results[2][0], atol=1e-5)


class RatingNet(nn.Module):
    """A 1-5 rating regressor built from a logit model: rating = 3 + z, shape (N, 1)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, None] + 3.0


def test_rating_model_uses_rating_minus_three(trained: TinyCNN, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    rating_model = CTClassifier(
        RatingNet(trained), arch="tiny_rating", arch_kwargs={}, spatial_dims=2, output="rating",
        window_hu=None,
    )
    torch.manual_seed(2)
    x_logit, by_logit = pgd(trained, x, y, 0.04, steps=30, loss="both")
    torch.manual_seed(2)
    x_rating, by_rating = pgd(rating_model, x, y, 0.04, steps=30, loss="both")
    assert 0 < by_logit.sum() < len(y)
    assert torch.equal(by_logit, by_rating)  # logit = rating - 3: the very same attack
    assert torch.allclose(x_logit, x_rating, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(by_rating, predicted_label(rating_model(x_rating), "rating") != y)
    # a registry rating model (untrained): runs, and `broken` follows predicted_label
    torch.manual_seed(0)
    model = build_model("nodule3d_fiveclass", spatial_dims=2, width=4)
    xr, yr = torch.rand(6, SIDE, SIDE), torch.tensor([0, 1, 0, 1, 0, 1])
    x_adv, broken = pgd(model, xr, yr, 0.1, steps=5)
    with torch.no_grad():
        assert torch.equal(broken, predicted_label(model(x_adv), "rating") != yr)


def test_eval_mode_and_caller_state_restored(test_set: tuple[Tensor, Tensor]) -> None:
    torch.manual_seed(0)
    model = build_model("nodule3d_bn", spatial_dims=2, width=4)
    x, y = test_set
    model.train()
    model(x)  # give the BatchNorm layers non-trivial running statistics
    model.net.out.requires_grad_(False)  # a partly frozen model: the mix must come back
    model.net.features[1].eval()  # and a mixed train/eval state
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    torch.manual_seed(5)
    x_adv, broken = pgd(model, x, y, 0.05, steps=10)

    for k, v in model.state_dict().items():  # running stats (and weights) unchanged
        assert torch.equal(v, stats[k]), k
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())  # gradient only w.r.t. the input
    model.eval()
    torch.manual_seed(5)
    x_eval, broken_eval = pgd(model, x, y, 0.05, steps=10)  # same attack as in eval mode
    assert torch.equal(x_adv, x_eval) and torch.equal(broken, broken_eval)


def test_works_inside_no_grad_and_autocast(trained: TinyCNN, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    torch.manual_seed(0)
    ref = pgd(trained, x, y, 0.04, steps=20)
    torch.manual_seed(0)
    with torch.no_grad():
        inside = pgd(trained, x, y, 0.04, steps=20)
    assert torch.equal(ref[0], inside[0])
    torch.manual_seed(0)
    x_adv, broken = pgd(trained, x, y, 0.04, steps=20, autocast=True)  # bf16 attack, fp32 verdict
    assert torch.equal(broken, predict_broken(trained, x_adv, y))
    assert abs(int(broken.sum()) - int(ref[1].sum())) <= 2


# ---------------------------------------------------------------------------------------------------
# losses, restarts, determinism


def test_both_losses_and_restarts_never_reduce_success(
    trained: TinyCNN, test_set: tuple[Tensor, Tensor]
) -> None:
    x, y = test_set
    runs = {}
    for loss, restarts in (("ce", 1), ("margin", 1), ("both", 1), ("ce", 3)):
        torch.manual_seed(7)
        runs[loss, restarts] = pgd(trained, x, y, 0.03, steps=20, loss=loss, restarts=restarts)[1]
    both = runs["both", 1]
    assert 0 < both.sum() < len(y)
    # same seed -> same random starts: "both" is the per-sample union of the two attacks
    assert torch.equal(both, runs["ce", 1] | runs["margin", 1])
    assert not (runs["ce", 1] & ~runs["ce", 3]).any()  # the first restart is the 1-restart run


class CountingModel(nn.Module):
    """Counts the samples that go through forward passes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.samples = net, 0

    def forward(self, x: Tensor) -> Tensor:
        self.samples += x.shape[0]
        return self.net(x)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.03), ("linf", 0.08), ("l2", 0.8)])
def test_early_stop_gives_the_same_verdict_for_fewer_passes(
    trained: TinyCNN, test_set: tuple[Tensor, Tensor], norm: str, eps: float
) -> None:
    x, y = test_set
    counted = CountingModel(trained)
    runs = {}
    for early in (False, True):
        counted.samples = 0
        torch.manual_seed(5)
        x_adv, broken = pgd(counted, x, y, eps, norm=norm, steps=40, loss="both", restarts=2, early_stop=early)
        runs[early] = (x_adv, broken, counted.samples)
    assert torch.equal(runs[False][1], runs[True][1])  # same random starts, same verdict per sample
    assert torch.equal(runs[True][1], predict_broken(trained, runs[True][0], y))
    assert runs[True][2] < runs[False][2]
    if bool(runs[True][1].float().mean() > 0.9):  # nearly all broken: most passes are saved
        assert runs[True][2] < 0.5 * runs[False][2]


def test_deterministic_under_manual_seed(trained: TinyCNN, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    out = []
    for _ in range(2):
        torch.manual_seed(11)
        out.append(pgd(trained, x, y, 0.5, norm="l2", steps=10, restarts=2, loss="both"))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = pgd(trained, x, y, 0.5, norm="l2", steps=10, generator=g1)
    b = pgd(trained, x, y, 0.5, norm="l2", steps=10, generator=g2)
    assert torch.equal(a[0], b[0])


def test_bad_arguments_raise_readable_errors(trained: TinyCNN, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    with pytest.raises(AttackError, match="norm"):
        pgd(trained, x, y, 0.1, norm="l1")
    with pytest.raises(ConfigError, match="loss"):  # AttackError is a ConfigError ...
        pgd(trained, x, y, 0.1, loss="dlr")
    with pytest.raises(ValueError, match="clip range"):  # ... and a ValueError
        pgd(trained, x * 2 + 1, y, 0.1)
    with pytest.raises(AttackError, match="eps"):
        pgd(trained, x, y, torch.tensor([0.1, -0.1]).repeat(24))
    with pytest.raises(AttackError, match="labels"):
        pgd(trained, x, y + 1, 0.1)
    with pytest.raises(AttackError, match="shape"):
        pgd(trained, x, y[:5], 0.1)


# ---------------------------------------------------------------------------------------------------
# sanity checks


def test_sanity_checks_pass_on_a_clean_model(trained: TinyCNN, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    torch.manual_seed(0)
    report = run_sanity_checks(trained, x, y, [0.01, 0.03, 0.06], norm="linf")  # 100-PGD, CE + margin
    assert report.passed, report.summary()
    assert [c["name"] for c in report.checks] == list(CHECKS)
    d = json.loads(json.dumps(report.to_dict()))  # JSON-serialisable
    assert d["passed"] is True and d["flags"] == []
    assert set(d["checks"][0]) == {"name", "passed", "value", "detail"}
    assert report.curve["accuracy"][-1] == 0.0  # whole input range: nothing survives
    torch.manual_seed(0)
    l2 = run_sanity_checks(trained, x, y, [0.3, 0.8], norm="l2")
    assert l2.passed, l2.summary()
    torch.manual_seed(0)
    fast = run_sanity_checks(trained, x, y, [0.01, 0.03, 0.06], norm="linf", early_stop=True)
    assert fast.passed, fast.summary()
    assert fast.curve == report.curve  # early stop changes the cost, not the numbers


@pytest.mark.parametrize("front", [RoundingLayer, SignFront])
@pytest.mark.parametrize(("norm", "eps_list"), [("linf", [0.01, 0.03, 0.06]), ("l2", [0.3, 0.8])])
def test_sanity_checks_flag_gradient_masking(
    trained: TinyCNN, test_set: tuple[Tensor, Tensor], front: type, norm: str, eps_list: list[float]
) -> None:
    x, y = test_set
    masked = front(trained)
    assert not predict_broken(masked, x, y).any()  # still a perfect classifier on clean inputs
    torch.manual_seed(0)
    report = run_sanity_checks(masked, x, y, eps_list, norm=norm, steps=50, early_stop=True)
    assert not report.passed
    assert "zero_gradient" in report.flags and "loss_increase" in report.flags
    assert {"large_eps_chance", "random_vs_gradient", "pgd_vs_fgsm"} & set(report.flags), report.summary()
    assert report.check("zero_gradient")["value"] == 1.0
    assert math.isclose(report.check("loss_increase")["value"], 0.0)

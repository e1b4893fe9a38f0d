"""BPGD (ma 2020, Algorithm 3): boundary points on analytic linear models whose exact margin is known.

For a linear binary classifier ``z = w·x + b`` the L2 distance of ``x`` to the decision boundary is
``|z|/‖w‖₂`` and the L∞ distance ``|z|/‖w‖₁``. L2 PGD moves along ``-w`` (normalised gradient) and L∞
PGD along ``-sign(w)``, i.e. both move along the optimal direction of their norm, so as long as the
box constraint does not interfere the distance BPGD reports is the exact margin up to the final
bisection bracket.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from ctharden.attacks import AttackError
from ctharden.attacks.bpgd import BPGD_ALPHA, bpgd
from ctharden.models import build_model

D = 5


# ---------------------------------------------------------------------------------------------------
# analytic models


class BinaryLinear(nn.Module):
    """``z = x·w + b`` as a binary logit ``(N,)`` (label 1 iff z > 0)."""

    def __init__(self, w: Tensor, b: float) -> None:
        super().__init__()
        self.lin = nn.Linear(w.numel(), 1)
        with torch.no_grad():
            self.lin.weight.copy_(w.reshape(1, -1))
            self.lin.bias.fill_(b)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).squeeze(1)


class Column(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, None]


class Rating(nn.Module):
    """A CTClassifier-like "rating" model: ``rating = z + 3`` (malignant iff rating > 3)."""

    def __init__(self, net: nn.Module, attribute: bool = False) -> None:
        super().__init__()
        self.net = net
        if attribute:
            self.output = "rating"

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + 3.0


def two_logit_linear(w: Tensor, b: float, seed: int = 0) -> nn.Linear:
    """``nn.Linear(d, 2)`` whose logit difference ``z1 - z0`` is ``x·w + b`` (random common part)."""
    g = torch.Generator().manual_seed(seed)
    common_w = torch.randn(w.numel(), generator=g)
    common_b = float(torch.randn((), generator=g))
    m = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        m.weight.copy_(torch.stack([common_w - w / 2, common_w + w / 2]))
        m.bias.copy_(torch.tensor([common_b - b / 2, common_b + b / 2]))
    return m


def geometry(seed: int = 0) -> tuple[Tensor, float, Tensor, Tensor]:
    """A random hyperplane through the cube's centre and points in [0.3, 0.7]^D; labels = the side."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g)
    w = 4.0 * w / w.norm()
    b = -float(w.sum()) * 0.5  # boundary through (0.5, ..., 0.5)
    x = 0.3 + 0.4 * torch.rand(64, D, generator=g)
    z = x @ w + b
    # not on the boundary, and close enough that the straight path to it stays inside [0, 1]
    keep = (z.abs() > 1e-3) & (z.abs() / w.norm() < 0.2)
    x, z = x[keep], z[keep]
    return w, b, x, (z > 0).long()


def true_margin(w: Tensor, b: float, x: Tensor, norm: str) -> Tensor:
    z = (x.double() @ w.double() + b).abs()
    return (z / (w.double().abs().sum() if norm == "linf" else w.double().norm())).float()


def norms(d: Tensor, norm: str) -> Tensor:
    f = d.flatten(1).float()
    return f.abs().amax(1) if norm == "linf" else f.norm(dim=1)


def predict(model: nn.Module, x: Tensor, kind: str) -> Tensor:
    with torch.no_grad():
        out = model(x)
    if kind == "rating":
        return (out.reshape(len(x)) > 3).long()
    if kind == "logit":
        return (out.reshape(len(x)) > 0).long()
    return out.argmax(1)


def model_of(kind: str, w: Tensor, b: float) -> tuple[nn.Module, str | None, str]:
    """(model, output= argument, how to read its prediction)."""
    if kind == "logit":
        return BinaryLinear(w, b), None, "logit"
    if kind == "column":
        return Column(BinaryLinear(w, b)), "logit", "logit"
    if kind == "logits2":
        return two_logit_linear(w, b), "logits2", "logits"
    if kind == "logits":
        return two_logit_linear(w, b), None, "logits"
    if kind == "rating":
        return Rating(BinaryLinear(w, b)), "rating", "rating"
    if kind == "rating_attr":
        return Rating(BinaryLinear(w, b), attribute=True), None, "rating"
    raise AssertionError(kind)


KINDS = ["logit", "column", "logits2", "logits", "rating", "rating_attr"]


# ---------------------------------------------------------------------------------------------------
# boundary points


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("kind", KINDS)
def test_boundary_bracket_and_exact_margin(norm: str, kind: str) -> None:
    w, b, x, y = geometry()
    model, output, read = model_of(kind, w, b)
    margin = true_margin(w, b, x, norm)
    assert len(x) > 40 and float(margin.max()) < 0.2  # the straight path stays inside [0, 1]
    eps, n_pgd, n_binary = 0.5, 20, 10
    r = bpgd(model, x, y, eps, norm=norm, n_pgd=n_pgd, n_binary=n_binary, output=output)

    assert r.correct.all() and r.found.all()
    assert torch.equal(predict(model, r.x_in, read), y)  # correctly classified end
    assert (predict(model, r.x_n, read) != y).all()  # misclassified end
    step = BPGD_ALPHA * eps / n_pgd
    assert (r.bracket <= step * 2.0**-n_binary + 1e-6).all()
    torch.testing.assert_close(r.bracket, norms(r.x_n - r.x_in, norm))
    torch.testing.assert_close(r.distance, norms(r.x_n - x, norm))
    # a misclassified point can never be closer than the exact margin ...
    assert (r.distance >= margin - 2e-5).all()
    # ... and PGD walks along the optimal direction, so it is the margin within the bracket
    assert (r.distance <= margin + r.bracket + 2e-5).all()
    assert (r.distance <= eps + 1e-6).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_found_iff_margin_within_eps(norm: str) -> None:
    """Case 0 / case 1 with a per-sample ε: found exactly where the margin lies inside the ball."""
    w, b, x, y = geometry(seed=1)
    model = BinaryLinear(w, b)
    margin = true_margin(w, b, x, norm)
    inside = torch.arange(len(x)) % 2 == 0
    eps = torch.where(inside, margin * 1.25, margin * 0.8)
    r = bpgd(model, x, y, eps, norm=norm)
    assert r.correct.all()
    assert torch.equal(r.found, inside)
    assert torch.isnan(r.distance[~inside]).all() and torch.isnan(r.bracket[~inside]).all()
    assert torch.isfinite(r.distance[inside]).all()
    assert (r.distance[inside] <= eps[inside] + 1e-6).all()
    assert (r.distance[inside] >= margin[inside] - 2e-5).all()
    # case 0: x_in is x and x_n the last PGD iterate (still correct, on the ε-sphere along -w)
    torch.testing.assert_close(r.x_in[~inside], x[~inside])
    assert (predict(model, r.x_n[~inside], "logit") == y[~inside]).all()
    torch.testing.assert_close(norms(r.x_n[~inside] - x[~inside], norm), eps[~inside], atol=1e-5, rtol=1e-4)


def test_eps_below_margin_everywhere_finds_nothing() -> None:
    w, b, x, y = geometry(seed=2)
    model = two_logit_linear(w, b)
    margin = true_margin(w, b, x, "l2")
    r = bpgd(model, x, y, float(margin.min()) * 0.9, norm="l2")
    assert r.correct.all() and not r.found.any()
    assert torch.isnan(r.distance).all() and torch.isnan(r.bracket).all()


def test_misclassified_inputs_are_not_searched() -> None:
    w, b, x, y = geometry(seed=3)
    model = BinaryLinear(w, b)
    wrong = torch.arange(len(x)) % 3 == 0
    y_given = torch.where(wrong, 1 - y, y)
    r = bpgd(model, x, y_given, 0.5, norm="l2")
    assert torch.equal(r.correct, ~wrong)
    assert not r.found[wrong].any()
    assert r.found[~wrong].all()
    assert torch.isnan(r.distance[wrong]).all()
    assert torch.equal(r.x_n[wrong], x[wrong]) and torch.equal(r.x_in[wrong], x[wrong])


def test_zero_eps_finds_nothing() -> None:
    w, b, x, y = geometry()
    r = bpgd(BinaryLinear(w, b), x, y, 0.0)
    assert r.correct.all() and not r.found.any()
    assert torch.equal(r.x_n, x)


def test_no_bisection_leaves_the_pgd_bracket() -> None:
    w, b, x, y = geometry()
    model = BinaryLinear(w, b)
    eps, n_pgd = 0.5, 20
    r0 = bpgd(model, x, y, eps, n_pgd=n_pgd, n_binary=0)
    r10 = bpgd(model, x, y, eps, n_pgd=n_pgd, n_binary=10)
    step = BPGD_ALPHA * eps / n_pgd
    assert (r0.bracket <= step + 1e-6).all()
    assert (r0.bracket > step / 2).any()  # really a PGD step, not bisected
    # L2 iterates lie on the ray x - t·w/‖w‖ at t = k·step: the wrong end is the first multiple
    margin = true_margin(w, b, x, "l2")
    torch.testing.assert_close(r0.distance, torch.ceil(margin / step) * step, atol=1e-5, rtol=0)
    # bisection only shrinks the bracket, inside the PGD bracket
    assert (r10.bracket <= r0.bracket * 2.0**-10 + 1e-6).all()
    assert (r10.distance <= r0.distance + 1e-6).all()
    assert (r10.distance >= r0.distance - r0.bracket - 1e-6).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_stays_in_eps_ball_and_clip_range(norm: str) -> None:
    """Points at the box edge whose ascent direction leaves the box: x_n, x_in within ε and [0, 1]."""
    w = torch.tensor([3.0, 1.5, -1.0])
    b = -1.0
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, generator=g)
    x[:, 1] = torch.where(torch.arange(40) % 2 == 0, 0.0, 1.0)  # on the box faces
    x[:5, 2] = 0.0
    z = x @ w + b
    y = (z > 0).long()
    eps = 0.6
    r = bpgd(BinaryLinear(w, b), x, y, eps, norm=norm)
    assert r.found.any() and (~r.found).any()
    for pts in (r.x_n, r.x_in):
        assert (pts >= 0).all() and (pts <= 1).all()
        assert (norms(pts - x, norm) <= eps + 1e-6).all()
    assert (r.distance[r.found] >= true_margin(w, b, x, norm)[r.found] - 2e-5).all()
    # with clip=None the same search may leave the box, still within ε
    r_free = bpgd(BinaryLinear(w, b), x, y, eps, norm=norm, clip=None)
    assert ((r_free.x_n < 0) | (r_free.x_n > 1)).any()
    assert (norms(r_free.x_n - x, norm) <= eps + 1e-6).all()


def test_inputs_outside_clip_range_need_clip_none() -> None:
    w = torch.tensor([1.0, 0.0])
    x = torch.tensor([[3.0, -1.0], [2.0, 5.0]])
    y = torch.tensor([1, 0])
    with pytest.raises(AttackError):
        bpgd(BinaryLinear(w, -2.5), x, y, 1.0)
    r = bpgd(BinaryLinear(w, -2.5), x, y, 1.0, clip=None)
    assert r.found.all()
    torch.testing.assert_close(r.distance, torch.tensor([0.5, 0.5]), atol=2e-4, rtol=0)


def test_dtype_and_inputs_preserved() -> None:
    w, b, x, y = geometry()
    x64 = x.double()
    before = x64.clone()
    r = bpgd(BinaryLinear(w, b), x64, y, 0.5)
    assert r.x_n.dtype == torch.float64 and r.x_in.dtype == torch.float64
    assert r.distance.dtype == torch.float32 and r.found.dtype == torch.bool
    assert torch.equal(x64, before)
    assert r.found.all()


def test_bad_arguments() -> None:
    w, b, x, y = geometry()
    model = BinaryLinear(w, b)
    for kwargs in ({"norm": "l1"}, {"loss": "both"}, {"n_pgd": 0}, {"n_binary": -1}, {"n_pgd": 2.0}):
        with pytest.raises(AttackError):
            bpgd(model, x, y, 0.5, **kwargs)
    with pytest.raises(AttackError):
        bpgd(model, x, y, -0.1)


# ---------------------------------------------------------------------------------------------------
# eval mode and the caller's model state


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(D)
        self.head = nn.Linear(D, 2)
        self.inner_modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inner_modes.append(self.bn.training)
        return self.head(self.bn(x))


def test_eval_mode_and_state_restored() -> None:
    torch.manual_seed(0)
    model = BNNet()
    with torch.no_grad():  # give the running statistics non-trivial values
        model.bn.running_mean.uniform_(0.3, 0.7)
        model.bn.running_var.uniform_(0.05, 0.1)
    model.train()
    model.head.bias.requires_grad_(False)  # a partly frozen model keeps its mix
    stats = {k: v.clone() for k, v in model.bn.state_dict().items()}
    x = 0.3 + 0.4 * torch.rand(32, D)
    y = predict(model.eval(), x, "logits")
    model.train()
    model.inner_modes.clear()
    r = bpgd(model, x, y, 2.0, norm="l2")
    assert r.found.any()
    assert len(model.inner_modes) > 3 and not any(model.inner_modes)  # every forward in eval mode
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert model.training and model.bn.training and model.head.training
    assert model.head.weight.requires_grad and not model.head.bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    # x_in/x_n were decided by the eval-mode model
    model.eval()
    assert torch.equal(predict(model, r.x_in[r.found], "logits"), y[r.found])
    assert (predict(model, r.x_n[r.found], "logits") != y[r.found]).all()


def test_module_flags_restored_when_model_partly_in_eval() -> None:
    model = BNNet()
    model.train()
    model.bn.eval()
    x = torch.rand(8, D)
    bpgd(model, x, predict(model, x, "logits"), 0.3)
    assert model.training and not model.bn.training and model.head.training


def test_state_restored_when_bpgd_raises() -> None:
    model = BNNet().train()
    x = torch.rand(4, D)
    with pytest.raises(AttackError):
        bpgd(model, x, torch.tensor([0, 1, 2, 0]), 0.3)  # label 2 for a two-class model
    assert model.training and model.bn.training
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# a real ctharden model


@pytest.mark.parametrize("arch", ["nodule3d", "nodule3d_fiveclass"])
def test_ctclassifier_boundary_points(arch: str) -> None:
    """A CTClassifier (binary logit or rating output, read from ``model.output``)."""
    torch.manual_seed(1)  # an initialisation whose gradient is not dead at these inputs
    model = build_model(arch, width=4)
    read = "rating" if model.output == "rating" else "logit"
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 16, 16, 16, generator=g)
    y = predict(model.eval(), x, read)
    model.train()
    eps, n_pgd, n_binary = 8.0, 10, 8
    r = bpgd(model, x, y, eps, norm="l2", n_pgd=n_pgd, n_binary=n_binary)
    assert model.training
    assert r.correct.all() and r.found.all()
    model.eval()
    assert torch.equal(predict(model, r.x_in, read), y)
    assert (predict(model, r.x_n, read) != y).all()
    assert (r.bracket <= BPGD_ALPHA * eps / n_pgd * 2.0**-n_binary + 1e-5).all()
    assert (norms(r.x_n - x, "l2") <= eps + 1e-4).all()
    assert (r.x_n >= 0).all() and (r.x_n <= 1).all()
    assert not math.isnan(float(r.distance.mean()))


# ---------------------------------------------------------------------------------------------------
# saturated cross-entropy


def _confident() -> tuple[nn.Module, Tensor, Tensor]:
    """z = 100·(x0 - 0.5): the sample at x0 = 0.8 has logit 30 and exact margin 0.3."""
    return BinaryLinear(torch.tensor([100.0, 0.0]), -50.0), torch.tensor([[0.8, 0.5]]), torch.tensor([1])


def test_confident_sample_found_with_margin_loss() -> None:
    model, x, y = _confident()
    r = bpgd(model, x, y, 0.5, loss="margin")
    assert r.found.all()
    torch.testing.assert_close(r.distance, torch.tensor([0.3]), atol=1e-4, rtol=0)


def test_confident_sample_found_with_default_loss() -> None:
    model, x, y = _confident()
    r = bpgd(model, x, y, 0.5)  # the default margin loss: CE's fp32 gradient is 0 here
    assert r.found.all()
    assert not bpgd(model, x, y, 0.5, loss="ce").found.any()  # why the default is the margin

"""The shared training loop and the baseline hardening methods of ma 2020 (adv ε, rand ε, TRADES)
plus NPS-noise augmentation: perturbation budgets, eval-mode attacks (BatchNorm statistics move only
in the loss forward), the loss formulas, the loop's bookkeeping and the batch layouts it accepts."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from ctharden.attacks import AttackError
from ctharden.core.errors import ConfigError
from ctharden.hardening.objectives import (
    AdvPGD,
    CleanCE,
    NPSNoise,
    RandNoise,
    Trades,
    ce_sum,
    class_logits,
    dataset_size,
    fit_with,
    indexed_batches,
)
from ctharden.noise import grid_variance

D = 6
Out = tuple[Tensor, dict[str, float]]  # a BatchLoss's return


def data(n: int = 24, seed: int = 0, lo: float = 0.0, hi: float = 1.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, D, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0.65).long()
    return x, y


def linear(seed: int = 0, out: int = 2) -> nn.Linear:
    torch.manual_seed(seed)
    m = nn.Linear(D, out)
    with torch.no_grad():
        m.weight.mul_(6.0)
    return m


class BNNet(nn.Module):
    """BatchNorm on the input, then a linear head; records the BN's mode at every forward."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bn = nn.BatchNorm1d(D)
        self.head = nn.Linear(D, 2)
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append(self.bn.training)
        return self.head(self.bn(x))


def spy_perturb(method: Any) -> list[Tensor]:
    """Record what ``method.perturb`` returns (and the model mode it ran in)."""
    seen: list[Tensor] = []
    original = method.perturb

    def perturb(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        assert not model.training, "perturbations must be drawn in eval mode"
        assert not any(p.requires_grad for p in model.parameters()), "parameters must be frozen"
        out = original(model, x, y)
        seen.append(out.detach().clone())
        return out

    method.perturb = perturb
    return seen


def norms(d: Tensor, norm: str) -> Tensor:
    f = d.flatten(1)
    return f.abs().amax(1) if norm == "linf" else f.norm(dim=1)


def ce_mean(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# ---------------------------------------------------------------------------------------------------
# losses


def test_class_logits_and_ce_sum() -> None:
    z = torch.tensor([0.5, -2.0, 3.0])
    y = torch.tensor([1, 0, 0])
    model = nn.Identity()
    cl = class_logits(model, z)
    torch.testing.assert_close(cl, torch.stack([torch.zeros(3), z], 1))
    torch.testing.assert_close(class_logits(model, z[:, None]), cl)
    torch.testing.assert_close(F.cross_entropy(cl, y, reduction="sum"), ce_sum(model, z, y))
    bce = F.binary_cross_entropy_with_logits(z, y.float(), reduction="sum")
    torch.testing.assert_close(ce_sum(model, z, y), bce)
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]])
    torch.testing.assert_close(class_logits(model, logits), logits)
    torch.testing.assert_close(ce_sum(model, logits, torch.tensor([2, 1])),
                               F.cross_entropy(logits, torch.tensor([2, 1]), reduction="sum"))


def test_clean_ce() -> None:
    model = linear()
    x, y = data()
    loss, stats = CleanCE()(model, x, y, torch.arange(len(x)))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    assert stats == {}


# ---------------------------------------------------------------------------------------------------
# adv ε


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_adv_pgd_within_budget_and_clip(norm: str) -> None:
    model = linear()
    x, y = data(64)
    x[:8, :] = 0.0  # on the box faces: the attack would leave [0, 1] without the clip
    x[8:16, :] = 1.0
    eps = 0.2
    method = AdvPGD(eps, norm=norm)
    seen = spy_perturb(method)
    torch.manual_seed(0)
    method(model, x, y, torch.arange(len(x)))
    xa = seen[0]
    assert xa.shape == x.shape
    assert (norms(xa - x, norm) <= eps + 1e-5).all()
    assert (xa >= 0).all() and (xa <= 1).all()
    assert (xa != x).any()
    # the worst case is kept: never a lower loss than the clean input
    assert (ce_mean(model, xa, y) >= ce_mean(model, x, y) - 1e-5).all()
    assert (ce_mean(model, xa, y) > ce_mean(model, x, y) + 1e-3).float().mean() > 0.5


def test_adv_pgd_without_clip_may_leave_unit_range() -> None:
    model = linear()
    x, y = data(32, lo=-2.0, hi=3.0)
    method = AdvPGD(0.5, norm="linf", clip=None)
    seen = spy_perturb(method)
    method(model, x, y, torch.arange(len(x)))
    assert (norms(seen[0] - x, "linf") <= 0.5 + 1e-5).all()


def test_adv_pgd_loss_is_mean_of_clean_and_adversarial_ce() -> None:
    model = linear(1)
    x, y = data(32, seed=1)
    method = AdvPGD(0.1, norm="l2")
    seen = spy_perturb(method)
    loss, stats = method(model, x, y, torch.arange(len(x)))
    xa = seen[0]
    with torch.no_grad():
        ce_x = F.cross_entropy(model(x), y, reduction="sum")
        expected = (ce_x + F.cross_entropy(model(xa), y, reduction="sum")) / (2 * len(x))
        acc = float((model(xa).argmax(1) == y).float().mean())
    torch.testing.assert_close(loss.detach(), expected)
    assert stats["perturbed_accuracy"] == pytest.approx(acc)
    assert loss.requires_grad


def test_adv_pgd_zero_eps_is_clean_pair() -> None:
    model = linear()
    x, y = data()
    loss, stats = AdvPGD(0.0)(model, x, y, torch.arange(len(x)))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))


def test_adv_pgd_attack_runs_in_eval_mode_batchnorm_stats() -> None:
    """The attack's forwards are eval mode; the single train-mode loss forward on cat([x, x_adv])
    updates the running statistics exactly once, to the values computed by hand."""
    model = BNNet()
    model.train()
    x, y = data(16)
    method = AdvPGD(0.2, norm="linf", n_pgd=5)
    seen = spy_perturb(method)
    method(model, x, y, torch.arange(len(x)))
    assert model.modes.count(True) == 1 and model.modes[-1] is True
    assert model.modes.count(False) >= 5  # the attack's passes
    assert model.training and model.bn.training
    assert all(p.requires_grad for p in model.parameters())
    both = torch.cat([x, seen[0]])
    m = model.bn.momentum
    torch.testing.assert_close(model.bn.running_mean, m * both.mean(0))
    torch.testing.assert_close(model.bn.running_var, (1 - m) * torch.ones(D) + m * both.var(0, unbiased=True))
    assert int(model.bn.num_batches_tracked) == 1


@pytest.mark.parametrize("method", [AdvPGD(0.1, n_pgd=4), RandNoise(0.1), Trades(0.1, n_pgd=4)],
                         ids=["adv", "rand", "trades"])
def test_one_batchnorm_update_per_training_step(method: Any) -> None:
    model = BNNet()
    x, y = data(30)
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)
    fit_with(model, loader, method, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    assert int(model.bn.num_batches_tracked) == 6
    assert model.modes.count(True) == 6
    assert not model.training


# ---------------------------------------------------------------------------------------------------
# rand ε


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_rand_noise_fills_the_ball(norm: str) -> None:
    torch.manual_seed(0)
    eps = 0.1
    x = torch.full((4000, 20), 0.5)
    xn = RandNoise(eps, norm=norm, clip=None).perturb(linear(), x, torch.zeros(4000, dtype=torch.long))
    d = xn - x
    assert (norms(d, norm) <= eps + 1e-6).all()
    if norm == "linf":  # uniform in [-ε, ε] per element
        assert float(d.abs().mean()) == pytest.approx(eps / 2, rel=0.03)
        assert float(d.abs().max()) > 0.99 * eps
        assert abs(float(d.mean())) < 0.01 * eps
    else:  # uniform direction, radius ε·U(0, 1)
        r = norms(d, "l2")
        assert float(r.mean()) == pytest.approx(eps / 2, rel=0.05)
        assert float(r.max()) > 0.99 * eps
        assert abs(float(d.mean(0).abs().max())) < 0.1 * eps


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_rand_noise_clip_and_loss(norm: str) -> None:
    model = linear()
    x, y = data(40)
    x[:10] = 0.0
    x[10:20] = 1.0
    method = RandNoise(0.3, norm=norm)
    seen = spy_perturb(method)
    loss, _ = method(model, x, y, torch.arange(len(x)))
    xn = seen[0]
    assert (xn >= 0).all() and (xn <= 1).all()
    assert (norms(xn - x, norm) <= 0.3 + 1e-6).all()
    with torch.no_grad():
        expected = (F.cross_entropy(model(x), y) + F.cross_entropy(model(xn), y)) / 2
    torch.testing.assert_close(loss.detach(), expected)


def test_bad_eps_and_norm() -> None:
    for cls in (AdvPGD, RandNoise, Trades):
        with pytest.raises(ConfigError):
            cls(-0.1)
        with pytest.raises(ConfigError):
            cls(float("nan"))
        with pytest.raises(ConfigError):
            cls(0.1, norm="l1")


# ---------------------------------------------------------------------------------------------------
# TRADES


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_trades_loss_and_adversary(norm: str) -> None:
    model = linear(2)
    x, y = data(32, seed=2)
    method = Trades(0.15, norm=norm, beta=6.0, n_pgd=10)
    torch.manual_seed(0)
    loss, stats = method(model, x, y, torch.arange(len(x)))
    natural = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    assert stats["kl"] > 0
    torch.testing.assert_close(loss.detach(), natural.detach() + 6.0 * stats["kl"], atol=1e-5, rtol=1e-5)
    assert float(loss.detach()) >= float(natural.detach())
    torch.manual_seed(0)
    xa = method._adversary(model, x)
    assert (norms(xa - x, norm) <= 0.15 + 1e-5).all()
    assert (xa >= 0).all() and (xa <= 1).all()
    # the KL maximiser beats random points of the same ball
    with torch.no_grad():
        p = F.softmax(model(x), 1)

        def kl(z: Tensor) -> float:
            return float(F.kl_div(F.log_softmax(model(z), 1), p, reduction="sum"))

        torch.manual_seed(1)
        rand = RandNoise(0.15, norm=norm).perturb(model, x, y)
        assert kl(xa) > kl(rand)


def test_trades_zero_eps_is_natural_ce_and_binary_logit_works() -> None:
    model = linear()
    x, y = data()
    loss, stats = Trades(0.0)(model, x, y, torch.arange(len(x)))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7)
    binary = nn.Sequential(linear(out=1), nn.Flatten(0))
    loss, stats = Trades(0.1, n_pgd=5)(binary, x, y, torch.arange(len(x)))
    natural = F.binary_cross_entropy_with_logits(binary(x), y.float())
    assert torch.isfinite(loss) and float(loss.detach()) >= float(natural.detach()) - 1e-6


# ---------------------------------------------------------------------------------------------------
# NPS noise


def _nps_std(mas: float, hw: tuple[int, int], spacing: float, hu: float) -> float:
    return math.sqrt(grid_variance(hw, spacing, mas)) / hu


def test_nps_noise_amplitude_follows_mas() -> None:
    torch.manual_seed(0)
    x = torch.full((8, 1, 64, 64), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    hu, spacing = 1400.0, 0.7
    stds = {}
    for mas in (25.0, 250.0):
        xn = NPSNoise([mas], spacing_mm=spacing, hu_per_unit=hu).perturb(nn.Identity(), x, y)
        assert xn.shape == x.shape and xn.dtype == x.dtype
        stds[mas] = float((xn - x).std())
        assert stds[mas] == pytest.approx(_nps_std(mas, (64, 64), spacing, hu), rel=0.1)
    assert stds[25.0] > 2.5 * stds[250.0]  # σ ∝ 1/sqrt(mAs): ratio sqrt(10)


def test_nps_noise_mas_drawn_per_sample() -> None:
    torch.manual_seed(0)
    x = torch.full((24, 48, 48), 0.5)  # (N, H, W) slices
    method = NPSNoise([10.0, 1000.0], spacing_mm=0.8, hu_per_unit=1400.0, seed=3)
    xn = method.perturb(nn.Identity(), x, torch.zeros(24, dtype=torch.long))
    per = (xn - x).flatten(1).std(1)
    lo, hi = _nps_std(1000.0, (48, 48), 0.8, 1400.0), _nps_std(10.0, (48, 48), 0.8, 1400.0)
    near_lo = (per / lo - 1).abs() < 0.25
    near_hi = (per / hi - 1).abs() < 0.25
    assert (near_lo ^ near_hi).all()  # every sample has one of the two levels
    assert near_lo.any() and near_hi.any()


def test_nps_noise_clamped_and_3d() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 4, 16, 16)  # (N, D, H, W) cubes
    method = NPSNoise([50.0], spacing_mm=1.0, hu_per_unit=1.0)
    xn = method.perturb(nn.Identity(), x, torch.zeros(3, dtype=torch.long))
    assert xn.shape == x.shape
    assert (xn >= 0).all() and (xn <= 1).all()
    assert ((xn == 0) | (xn == 1)).float().mean() > 0.5  # noise of ~17 "units" saturates


def test_nps_noise_training_step() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 2))
    x = torch.rand(6, 1, 16, 16)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    method = NPSNoise([25.0, 100.0], spacing_mm=0.7, hu_per_unit=1400.0)
    seen = spy_perturb(method)
    loss, _ = method(model, x, y, torch.arange(6))
    with torch.no_grad():
        expected = (F.cross_entropy(model(x), y) + F.cross_entropy(model(seen[0]), y)) / 2
    torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mas_levels": []},
        {"mas_levels": [0.0]},
        {"mas_levels": [-5.0]},
        {"hu_per_unit": 0.0},
        {"spacing_mm": -1.0},
    ],
)
def test_nps_noise_bad_config(kwargs: dict) -> None:
    args = {"mas_levels": [50.0], "spacing_mm": 0.7, "hu_per_unit": 1400.0, **kwargs}
    with pytest.raises(ConfigError):
        NPSNoise(**args)


# ---------------------------------------------------------------------------------------------------
# fit_with


class Recorder:
    """CleanCE with an end_epoch hook, recording the (x, y, idx) it is given."""

    name = "rec"

    def __init__(self) -> None:
        self.seen: list[tuple[Tensor, Tensor, Tensor]] = []
        self.ends: list[int] = []

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> Out:
        assert model.training
        self.seen.append((x, y, idx))
        return F.cross_entropy(model(x), y), {"stat": float(len(x))}

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        self.ends.append(epoch)
        return {"hook": 10.0 + epoch}


def test_fit_with_history_and_hooks() -> None:
    model = linear()
    x, y = data(25)
    method = Recorder()
    calls: list[tuple[int, dict]] = []
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)
    before = model.weight.detach().clone()
    history = fit_with(model, loader, method, epochs=3, on_epoch=lambda e, r: calls.append((e, r)))
    assert len(history) == 3
    assert [e for e, _ in calls] == [0, 1, 2] and [r for _, r in calls] == history
    assert method.ends == [0, 1, 2]
    for epoch, rec in enumerate(history):
        assert rec["epoch"] == epoch and rec["hook"] == 10.0 + epoch
        assert math.isfinite(rec["loss"])
        assert rec["stat"] == pytest.approx((10 * 10 + 10 * 10 + 5 * 5) / 25)  # sample-weighted mean
    assert len(method.seen) == 9
    for bx, by, idx in method.seen:  # (x, y) batches arrive with their dataset index
        assert bx.dtype == torch.float32 and by.dtype == torch.long and idx.dtype == torch.long
        assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])
    assert sorted(torch.cat([i for _, _, i in method.seen[:3]]).tolist()) == list(range(25))
    assert not torch.equal(model.weight, before)  # the default optimizer stepped
    assert not model.training


def test_fit_with_non_finite_loss_raises() -> None:
    class NaNLoss:
        name = "nan"

        def __call__(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> Out:
            return model(x).sum() * float("nan"), {}

    model = linear()
    x, y = data()
    with pytest.raises(AttackError, match="non-finite"):
        fit_with(model, DataLoader(TensorDataset(x, y), batch_size=8), NaNLoss(), epochs=1)
    assert issubclass(AttackError, ConfigError)


@pytest.mark.parametrize("epochs", [0, -1, 1.0, True])
def test_fit_with_bad_epochs(epochs: Any) -> None:
    x, y = data()
    with pytest.raises(ConfigError):
        fit_with(linear(), DataLoader(TensorDataset(x, y), batch_size=8), CleanCE(), epochs=epochs)


# ---------------------------------------------------------------------------------------------------
# indexed_batches


class Quad(Dataset):
    """ctharden's (x, y, target, idx) layout."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, int]:
        return self.x[i], self.y[i], self.y[i].float(), i


def test_indexed_batches_layouts() -> None:
    x, y = data(11)
    torch.manual_seed(0)
    got = list(indexed_batches(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)))
    assert [len(b[0]) for b in got] == [4, 4, 3]
    idx = torch.cat([b[2] for b in got])
    assert sorted(idx.tolist()) == list(range(11)) and idx.tolist() != list(range(11))  # shuffled
    for bx, by, bi in got:
        assert torch.equal(bx, x[bi]) and torch.equal(by, y[bi])

    perm = torch.randperm(11)
    triples = list(indexed_batches(DataLoader(TensorDataset(x, y, perm), batch_size=4)))
    torch.testing.assert_close(torch.cat([b[2] for b in triples]), perm)

    quads = list(indexed_batches(DataLoader(Quad(x, y), batch_size=5, shuffle=True)))
    for bx, by, bi in quads:
        assert torch.equal(bx, x[bi]) and torch.equal(by, y[bi])
    assert sorted(torch.cat([b[2] for b in quads]).tolist()) == list(range(11))
    assert all(torch.equal(bx, x[i * 4 : i * 4 + 4]) for i, (bx, _, _) in enumerate(triples))


def test_indexed_batches_bad_layouts() -> None:
    x, y = data(8)
    with pytest.raises(ConfigError):  # (x,)
        list(indexed_batches(DataLoader(TensorDataset(x), batch_size=4)))
    with pytest.raises(ConfigError):  # five fields
        list(indexed_batches(DataLoader(TensorDataset(x, y, y, y, y), batch_size=4)))
    with pytest.raises(ConfigError):  # a bare tensor per batch
        list(indexed_batches(DataLoader(x, batch_size=4)))
    with pytest.raises(ConfigError):  # (x, y) without a batch sampler cannot be indexed
        list(indexed_batches(DataLoader(TensorDataset(x, y), batch_size=None)))
    with pytest.raises(ConfigError):
        fit_with(linear(), DataLoader(TensorDataset(x), batch_size=4), CleanCE(), epochs=1)


def test_dataset_size() -> None:
    x, y = data(9)
    assert dataset_size(DataLoader(TensorDataset(x, y), batch_size=4)) == 9

    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield from zip(x, y, strict=True)

    with pytest.raises(ConfigError):
        dataset_size(DataLoader(Stream(), batch_size=4))


def test_indexed_batches_keeps_the_loaders_order() -> None:
    x, y = data(12)
    g = torch.Generator()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=g)
    g.manual_seed(0)
    direct = [b[0] for b in loader]
    g.manual_seed(0)
    indexed = [b[0] for b in indexed_batches(loader)]
    assert all(torch.equal(a, b) for a, b in zip(direct, indexed, strict=True))

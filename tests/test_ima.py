"""IMA training (ma 2020, Algorithms 1-2): margin bookkeeping on frozen analytic models, the batch
loss, loader layouts, argument checks, and a small end-to-end training run.

The frozen toy model is the binary logit ``z = 4·(x0 - 0.5)`` on 2-D points: the L2 and the L∞
distance of a point to its boundary are both ``|x0 - 0.5|``, so Algorithm 2's three cases
(misclassified -> Δε, boundary found -> its distance, not found -> E + Δε, then the clip into
[Δε, ε_max]) can be predicted exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ctharden.attacks.bpgd import bpgd
from ctharden.attacks.pgd import pgd
from ctharden.core.errors import ConfigError
from ctharden.hardening import ima
from ctharden.hardening.ima import IMALoss, IMAState, suggest_eps
from ctharden.hardening.objectives import CleanCE, fit_with

TOL = 1e-3  # bisection bracket (≤ 0.2·E·2^-10) plus float slack


class Step(nn.Module):
    """Binary logit ``z = k·(x0 - c)`` (label 1 iff x0 > c); distance to the boundary |x0 - c|."""

    def __init__(self, k: float = 4.0, c: float = 0.5) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[k, 0.0]]))
            self.lin.bias.fill_(-k * c)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).squeeze(1)


def points(x0: list[float]) -> Tensor:
    return torch.stack([torch.tensor(x0), torch.full((len(x0),), 0.5)], dim=1)


def frozen_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.0)


def simulate(
    margin: np.ndarray, correct: np.ndarray, delta: float, eps_max: float, epochs: int
) -> list[np.ndarray]:
    """Algorithm 2 for a frozen model whose exact margins are ``margin``."""
    e = np.full(margin.shape, delta)
    out = []
    for _ in range(epochs):
        new = np.where(margin <= e, margin, e + delta)
        new = np.where(correct, new, delta)
        e = np.clip(new, delta, eps_max)
        out.append(e.copy())
    return out


# ---------------------------------------------------------------------------------------------------
# Algorithm 2 on IMALoss directly (frozen model: the loss is computed but never stepped)

# sample: x0, label, margin before the epoch -> expected margin after it (Δε = 0.05, ε_max = 0.4)
CASES = [
    (0.30, 1, 0.40, 0.05),  # misclassified -> re-initialised to Δε
    (0.70, 1, 0.30, 0.20),  # boundary at 0.2 inside E = 0.3 -> shrinks to the found distance
    (0.90, 1, 0.10, 0.15),  # boundary at 0.4 outside E = 0.1 -> expands by Δε
    (0.95, 1, 0.38, 0.40),  # not found, E + Δε = 0.43 -> clipped to ε_max
    (0.52, 1, 0.30, 0.05),  # found at 0.02 < Δε -> clipped up to Δε
    (0.20, 0, 0.35, 0.30),  # label 0 side: found at 0.3
    (0.47, 0, 0.05, 0.05),  # found at 0.03 inside the smallest ball E = Δε -> Δε
]


def _ima_loss(norm: str, margin_update: str = "batch", loader: DataLoader | None = None) -> IMALoss:
    return IMALoss(len(CASES), eps_max=0.4, delta=0.05, norm=norm, beta=0.5, n_pgd=20, n_binary=10,
                   clip=(0.0, 1.0), margin_update=margin_update, loader=loader, device=torch.device("cpu"))


def _case_tensors() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x = points([c[0] for c in CASES])
    y = torch.tensor([c[1] for c in CASES])
    before = torch.tensor([c[2] for c in CASES])
    after = torch.tensor([c[3] for c in CASES])
    return x, y, before, after, torch.arange(len(CASES))


def test_initial_margins_are_delta() -> None:
    loss = IMALoss(7, eps_max=0.3, delta=0.03, norm="l2", beta=0.5, n_pgd=20, n_binary=10, clip=None)
    assert loss.state.margins.dtype == torch.float32 and loss.state.margins.shape == (7,)
    assert torch.all(loss.state.margins == torch.tensor(0.03))
    assert loss.state.history == []


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_algorithm2_cases_batch_update(norm: str) -> None:
    model = Step()
    x, y, before, after, idx = _case_tensors()
    method = _ima_loss(norm)
    method.state.margins = before.clone()
    method.pending = before.clone()
    loss, stats = method(model, x, y, idx)
    # every batch of the epoch sees the previous epoch's margins: nothing applied yet
    torch.testing.assert_close(method.state.margins, before)
    assert stats["clean_accuracy"] == pytest.approx(6 / 7)
    assert stats["boundary_found"] == pytest.approx(4 / 7)
    record = method.end_epoch(model, 0)
    torch.testing.assert_close(method.state.margins, after, atol=TOL, rtol=0)
    assert len(method.state.history) == 1
    np.testing.assert_allclose(method.state.history[0], method.state.margins.numpy())
    assert record["margin_mean"] == pytest.approx(float(after.mean()), abs=TOL)
    assert record["margin_at_max"] == pytest.approx(1 / 7)
    # found distances are never below the exact margin (before the clip)
    m = (x[:, 0] - 0.5).abs()
    res = bpgd(model, x, y, before, norm=norm)
    assert (res.distance[res.found] >= m[res.found] - 1e-5).all()


def test_algorithm1_loss_value() -> None:
    """L = ((1-β)(L0 + L1) + β·L2) / batch_size with summed CEs; L2 over found boundary points only."""
    model = Step()
    x, y, before, _, idx = _case_tensors()
    beta = 0.3
    method = IMALoss(len(CASES), eps_max=0.4, delta=0.05, norm="l2", beta=beta, n_pgd=20, n_binary=10,
                     clip=(0.0, 1.0))
    method.state.margins = before.clone()
    loss, _ = method(model, x, y, idx)
    res = bpgd(model, x, y, before, norm="l2")  # deterministic: the same boundary points
    assert 0 < int(res.found.sum()) < len(x)
    bce = nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        l01 = bce(model(x), y.float(), reduction="sum")
        l2 = bce(model(res.x_n[res.found]), y[res.found].float(), reduction="sum")
    expected = ((1 - beta) * l01 + beta * l2) / len(x)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert loss.requires_grad  # the loss back-propagates into the model


def test_algorithm1_loss_without_boundary_points() -> None:
    model = Step()
    x = points([0.9, 0.1])
    y = torch.tensor([1, 0])
    method = IMALoss(2, eps_max=0.4, delta=0.05, norm="l2", beta=0.5, n_pgd=20, n_binary=10, clip=(0.0, 1.0))
    loss, stats = method(model, x, y, torch.arange(2))
    assert stats["boundary_found"] == 0.0
    with torch.no_grad():
        l01 = nn.functional.binary_cross_entropy_with_logits(model(x), y.float(), reduction="sum")
    torch.testing.assert_close(loss.detach(), 0.5 * l01 / 2)
    loss.backward()
    assert model.lin.weight.grad is not None


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_algorithm2_cases_pass_update(norm: str) -> None:
    """``margin_update="pass"``: the training step records nothing; a BPGD pass after the epoch does."""
    model = Step()
    x, y, before, after, idx = _case_tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True)
    method = _ima_loss(norm, "pass", loader)
    method.state.margins = before.clone()
    method.pending = before.clone()
    method(model, x[:4], y[:4], idx[:4])
    torch.testing.assert_close(method.pending, before)
    model.train()
    method.end_epoch(model, 0)
    assert model.training  # the pass ran in attack mode and restored the flag
    torch.testing.assert_close(method.state.margins, after, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Algorithm 2 through fit (frozen model)

X0 = [0.55, 0.67, 0.76, 0.85, 0.96, 0.3, 0.12, 0.44]
Y = [1, 1, 1, 1, 1, 1, 0, 0]  # 0.3 with label 1 is misclassified
EPS_MAX, EPOCHS = 0.4, 5  # Δε = 0.08


def _expected() -> list[np.ndarray]:
    x0 = np.array(X0)
    y = np.array(Y)
    margin = np.abs(x0 - 0.5)
    correct = (x0 > 0.5) == (y == 1)
    return simulate(margin, correct, EPS_MAX / EPOCHS, EPS_MAX, EPOCHS)


@pytest.mark.parametrize("margin_update", ["batch", "pass"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fit_margins_follow_algorithm2(margin_update: str, norm: str) -> None:
    model = Step()
    x, y = points(X0), torch.tensor(Y)
    state: list[IMAState] = []
    records: list[tuple[int, dict]] = []
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True)
    _, margins = ima.fit(
        model, loader, eps_max=EPS_MAX, epochs=EPOCHS, norm=norm, optimizer=frozen_sgd(model),
        margin_update=margin_update, state=state, on_epoch=lambda e, r: records.append((e, r)),
    )
    assert len(state) == 1
    st = state[0]
    assert st.delta == pytest.approx(EPS_MAX / EPOCHS) and st.eps_max == EPS_MAX
    assert len(st.history) == EPOCHS
    for got, want in zip(st.history, _expected(), strict=True):
        np.testing.assert_allclose(got, want, atol=TOL)
    torch.testing.assert_close(margins, torch.from_numpy(st.history[-1]))
    assert margins.dtype == torch.float32 and margins.device.type == "cpu"
    assert [e for e, _ in records] == list(range(EPOCHS))
    assert records[-1][1]["margin_mean"] == pytest.approx(float(margins.mean()))
    assert not model.training  # fit leaves the model in eval mode


def test_fit_indexes_margins_by_dataset_index() -> None:
    """A shuffled (x, y) loader and (x, y, idx) loaders with a permuted index agree per index."""
    model = Step()
    x, y = points(X0), torch.tensor(Y)
    torch.manual_seed(1)
    _, m_plain = ima.fit(model, DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True),
                         eps_max=EPS_MAX, epochs=EPOCHS, optimizer=frozen_sgd(model))
    torch.manual_seed(2)
    indexed = TensorDataset(x, y, torch.arange(len(x)))
    _, m_idx = ima.fit(model, DataLoader(indexed, batch_size=3, shuffle=True),
                       eps_max=EPS_MAX, epochs=EPOCHS, optimizer=frozen_sgd(model))
    torch.testing.assert_close(m_plain, m_idx, atol=1e-6, rtol=0)
    np.testing.assert_allclose(m_plain.numpy(), _expected()[-1], atol=TOL)
    # the index, not the position, addresses the margin: sample i is stored at perm[i]
    perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    _, m_perm = ima.fit(model, DataLoader(TensorDataset(x, y, perm), batch_size=3, shuffle=False),
                        eps_max=EPS_MAX, epochs=EPOCHS, optimizer=frozen_sgd(model))
    torch.testing.assert_close(m_perm[perm], m_plain, atol=1e-6, rtol=0)
    assert not torch.allclose(m_perm, m_plain)


def test_fit_initial_margin_is_default_delta() -> None:
    """Frozen model, Δε = ε_max/epochs = 0.1: far samples expand from Δε to 2Δε after the first epoch,
    misclassified ones stay at Δε; the history holds one entry per epoch."""
    model = Step()
    x = points([0.95, 0.05, 0.3])
    y = torch.tensor([1, 0, 1])
    state: list[IMAState] = []
    _, m = ima.fit(model, DataLoader(TensorDataset(x, y), batch_size=2), eps_max=0.3, epochs=3,
                   optimizer=frozen_sgd(model), state=state)
    hist = state[0].history
    assert len(hist) == 3 and state[0].delta == pytest.approx(0.1)
    np.testing.assert_allclose(hist[0], [0.2, 0.2, 0.1], atol=1e-6)
    np.testing.assert_allclose(hist[1], [0.3, 0.3, 0.1], atol=1e-6)
    torch.testing.assert_close(m, torch.tensor([0.3, 0.3, 0.1]))


def test_fit_clip_none_inputs_outside_unit_range() -> None:
    model = Step(k=1.0, c=2.0)  # boundary at x0 = 2
    x = torch.tensor([[2.3, -5.0], [1.5, 7.0], [3.5, 0.0], [-1.0, 2.0]])
    y = torch.tensor([1, 0, 1, 1])  # the last is misclassified
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(ConfigError):  # the default clip range rejects such inputs
        ima.fit(model, loader, eps_max=1.2, epochs=3, optimizer=frozen_sgd(model))
    model = Step(k=1.0, c=2.0)
    _, m = ima.fit(model, loader, eps_max=1.2, epochs=3, clip=None, optimizer=frozen_sgd(model))
    margin = (x[:, 0] - 2.0).abs().numpy()
    want = simulate(margin, np.array([True, True, True, False]), 0.4, 1.2, 3)[-1]
    np.testing.assert_allclose(m.numpy(), want, atol=TOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "l1"},
        {"eps_max": 0.0},
        {"eps_max": -0.1},
        {"eps_max": float("nan")},
        {"eps_max": float("inf")},
        {"epochs": 0},
        {"epochs": 1.5},
        {"epochs": True},
        {"beta": 2.0},
        {"beta": -0.1},
        {"delta": 0.5},
        {"delta": 0.0},
        {"margin_update": "epoch"},
    ],
)
def test_fit_bad_arguments(kwargs: dict) -> None:
    model = Step()
    loader = DataLoader(TensorDataset(points([0.7]), torch.tensor([1])), batch_size=1)
    args = {"eps_max": 0.3, "epochs": 2, **kwargs}
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ConfigError):
        ima.fit(model, loader, **args)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------
# training


def ring(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Label 1 in a disc of radius 0.15 around (0.5, 0.5), label 0 in the ring 0.3-0.45."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    r = torch.where(y == 1, 0.15 * torch.rand(n, generator=g).sqrt(), 0.3 + 0.15 * torch.rand(n, generator=g))
    th = 2 * math.pi * torch.rand(n, generator=g)
    return 0.5 + torch.stack([r * th.cos(), r * th.sin()], 1), y


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> float:
    torch.manual_seed(0)
    _, broken = pgd(model, x, y, eps, norm="l2", steps=20)
    return 1.0 - float(broken.float().mean())


def test_ima_training_grows_margins_and_beats_ce_twin() -> None:
    """Seeded regression (seed 1, verified): after 10 epochs IMA's margins have grown from Δε and its
    L2 robust accuracy is at least the CE twin's at every ε checked, strictly higher at ε = 0.05."""
    seed, epochs, lr = 1, 10, 0.02
    x, y = ring(128, 1)
    xt, yt = ring(512, 2)
    model, twin = mlp(seed), mlp(seed)
    state: list[IMAState] = []
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    _, margins = ima.fit(model, loader, eps_max=0.15, epochs=epochs, delta=0.015,
                         optimizer=torch.optim.Adam(model.parameters(), lr=lr), state=state)
    torch.manual_seed(seed)
    fit_with(twin, loader, CleanCE(), epochs=epochs, optimizer=torch.optim.Adam(twin.parameters(), lr=lr))

    history = np.stack(state[0].history)
    assert history[0].mean() < history[-1].mean()
    assert float(margins.mean()) > 3 * 0.015
    acc = {e: (robust_accuracy(model, xt, yt, e), robust_accuracy(twin, xt, yt, e))
           for e in (0.03, 0.05, 0.07)}
    assert all(a >= c for a, c in acc.values()), acc
    assert acc[0.05][0] > acc[0.05][1] + 0.02, acc


# ---------------------------------------------------------------------------------------------------
# suggest_eps


def test_suggest_eps() -> None:
    m = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.5, 0.5])
    assert suggest_eps(m, 0.5) == pytest.approx(0.2)
    assert suggest_eps(m.numpy(), 0.5, quantile=0.0) == pytest.approx(0.1)
    assert suggest_eps(m, 0.5, quantile=1.0) == pytest.approx(0.3)
    assert suggest_eps(torch.full((4,), 0.5), 0.5) == pytest.approx(0.25)
    assert suggest_eps(np.array([0.5, 0.5]), 0.5) == pytest.approx(0.25)
    # margins that fit below a larger ε_max all count
    assert suggest_eps(m, 1.0) == pytest.approx(float(torch.quantile(m, 0.5)))

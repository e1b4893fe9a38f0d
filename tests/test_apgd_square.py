"""Auto-PGD, the Square Attack and the AutoAttack-style ensemble: budgets and clipping on 2D, 3D and
two-logit models, fp32 verdicts, determinism, strength against PGD, the gradient-masking flag on
masked models (rounding and saturating input fronts) and argument errors.

The models are trained here on separable blobs (seconds); ε values were picked by measuring on
these fixtures (see the comments) and the assertions leave room around them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from ctharden.attacks import (
    AttackError,
    EnsembleResult,
    apgd,
    attack_ensemble,
    pgd,
    predict_broken,
    square_attack,
    square_attack_result,
)
from ctharden.attacks import ensemble as ensemble_module
from ctharden.attacks.apgd import checkpoints
from ctharden.attacks.ensemble import check_gradient_masking, ensemble_sweep
from ctharden.attacks.square import SquareResult, p_selection
from ctharden.models import build_model

SIDE, SIDE3 = 16, 8


# ---------------------------------------------------------------------------------------------------
# data and models


def blobs(n: int, seed: int, side: int = SIDE, dims: int = 2) -> tuple[Tensor, Tensor]:
    """Separable ``(N, 1, side, ...)`` inputs in [0, 1]: a bright (y = 1) or dark (y = 0) central
    Gaussian blob of random amplitude 0.05-0.30 on a noisy grey background (as tests/test_pgd.py)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    axis = torch.arange(side, dtype=torch.float32)
    grids = torch.meshgrid(*([axis] * dims), indexing="ij")
    centre = (side - 1) / 2
    r2 = torch.stack([(grid - centre) ** 2 for grid in grids]).sum(0)
    blob = torch.exp(-r2 / (2 * (3.0 * side / 16) ** 2))
    amp = (0.05 + 0.25 * torch.rand(n, generator=g)) * (2 * y - 1)
    x = 0.5 + 0.05 * torch.randn(n, 1, *([side] * dims), generator=g) + amp.reshape(n, *([1] * (dims + 1))) * blob
    return x.clamp(0, 1), y


class TinyCNN(nn.Module):
    """``(N, 1, side^dims)`` -> binary logit ``(N,)`` (``out=1``) or two logits ``(N, 2)``."""

    def __init__(self, dims: int = 2, out: int = 1, side: int = SIDE) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        pool = nn.AvgPool2d if dims == 2 else nn.AvgPool3d
        self.out = out
        self.features = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU(), pool(4), nn.Flatten())
        self.head = nn.Linear(4 * (side // 4) ** dims, out)

    def forward(self, x: Tensor) -> Tensor:
        z: Tensor = self.head(self.features(x))
        return z.squeeze(1) if self.out == 1 else z


class RoundingLayer(nn.Module):
    """x -> round(8x)/8 in front of a classifier: zero gradient almost everywhere (masking)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(torch.round(x * 8) / 8)
        return out


class SaturatingFront(nn.Module):
    """A steep hard-tanh front, 0.5 + 0.15·hardtanh(1000(x − 0.5)): it binarises the input and its
    gradient is exactly zero outside |x − 0.5| < 0.001 (masking by saturation)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(0.5 + 0.15 * nn.functional.hardtanh(1000 * (x - 0.5)))
        return out


def _train(model: nn.Module, x: Tensor, y: Tensor, steps: int = 200) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        z = model(x)
        if z.dim() == 1:
            loss = nn.functional.binary_cross_entropy_with_logits(z, y.float())
        else:
            loss = nn.functional.cross_entropy(z, y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The attacks' many small passes run faster on one thread (and share a busy CPU better)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def net2d() -> nn.Module:
    torch.manual_seed(0)
    return _train(TinyCNN(), *blobs(256, seed=0))


@pytest.fixture(scope="module")
def net_two() -> nn.Module:
    torch.manual_seed(1)
    return _train(TinyCNN(out=2), *blobs(256, seed=0))


@pytest.fixture(scope="module")
def net3d() -> nn.Module:
    torch.manual_seed(2)
    return _train(TinyCNN(dims=3, side=SIDE3), *blobs(128, seed=0, side=SIDE3, dims=3))


@pytest.fixture(scope="module")
def data2d() -> tuple[Tensor, Tensor]:
    return blobs(48, seed=1)


@pytest.fixture(scope="module")
def data3d() -> tuple[Tensor, Tensor]:
    return blobs(24, seed=1, side=SIDE3, dims=3)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _size(d: Tensor, norm: str) -> Tensor:
    f = d.flatten(1).double()
    return f.abs().amax(1) if norm == "linf" else f.norm(dim=1)


def _robust(broken: Tensor) -> float:
    return 1.0 - float(broken.float().mean())


# ---------------------------------------------------------------------------------------------------
# budgets, clipping, verdicts, determinism


def _run(attack: str, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, norm: str, seed: int = 0
         ) -> tuple[Tensor, Tensor]:
    result: tuple[Tensor, Tensor]
    if attack == "apgd":
        result = apgd(model, x, y, eps, norm=norm, steps=20, generator=_gen(seed))
    else:
        result = square_attack(model, x, y, eps, norm=norm, queries=150, generator=_gen(seed))
    return result


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("attack", ["apgd", "square"])
@pytest.mark.parametrize("kind", ["2d", "two", "3d"])
def test_budget_clip_verdict_and_determinism(
    request: pytest.FixtureRequest, attack: str, norm: str, kind: str
) -> None:
    model = request.getfixturevalue({"2d": "net2d", "two": "net_two", "3d": "net3d"}[kind])
    x, y = request.getfixturevalue("data3d" if kind == "3d" else "data2d")
    x, y = x[:16].clone(), y[:16]
    x[0] = 0.0  # corners of the range: clipping must bite here
    x[1] = 1.0
    big = 0.1 if norm == "linf" else (1.0 if kind != "3d" else 0.8)
    per_sample = torch.full((16,), big)
    per_sample[2], per_sample[3] = 0.0, big / 4
    clean = predict_broken(model, x, y)
    for eps in (big, per_sample):
        x_adv, broken = _run(attack, model, x, y, eps, norm)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert broken.shape == (16,) and broken.dtype == torch.bool
        budget = torch.as_tensor(eps, dtype=torch.float64).expand(16)
        assert (_size(x_adv - x, norm) <= budget + 1e-6 * budget.clamp_min(1.0)).all()
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        assert torch.equal(broken, predict_broken(model, x_adv, y))  # a fresh fp32 forward
        assert broken[clean].all()  # clean errors stay broken
        assert _robust(broken) <= _robust(clean)
        again, broken_again = _run(attack, model, x, y, eps, norm)  # same seed: same result
        assert torch.equal(again, x_adv) and torch.equal(broken_again, broken)
    assert torch.equal(x_adv[2], x[2])  # ε = 0: untouched


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_on_a_channel_less_3d_ctclassifier(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model("nodule3d", width=4)  # CTClassifier: (N, 16, 16, 16), cubes over all 3 dims
    x = torch.rand(3, 16, 16, 16)
    y = torch.tensor([0, 1, 0])
    eps = 0.05 if norm == "linf" else 1.0
    r = square_attack_result(model, x, y, eps, norm=norm, queries=20, generator=_gen())
    assert isinstance(r, SquareResult) and r.x_adv.shape == x.shape
    assert (_size(r.x_adv - x, norm) <= eps * (1 + 1e-6)).all()
    assert torch.equal(r.broken, predict_broken(model, r.x_adv, y))


def test_a_misclassified_sample_is_broken(net2d: nn.Module, data2d: tuple[Tensor, Tensor]) -> None:
    x, y = data2d
    x, y = x[:8], y[:8].clone()
    y[0] = 1 - y[0]  # the clean model is now wrong on sample 0
    assert predict_broken(net2d, x, y)[0]
    for norm in ("linf", "l2"):
        _, b_apgd = apgd(net2d, x, y, 0.01, norm=norm, steps=10, generator=_gen())
        r = square_attack_result(net2d, x, y, 0.01, norm=norm, queries=30, generator=_gen())
        assert b_apgd[0] and r.broken[0]
        assert r.queries[0] == 0 and torch.equal(r.x_adv[0], x[0])  # not attacked, not queried
        ens = attack_ensemble(net2d, x, y, 0.01, norm=norm, steps=10, square_queries=30, generator=_gen())
        assert ens.broken[0] and not ens.clean_correct[0]
        assert not any(bool(hit[0]) for hit in ens.broken_by.values())  # nobody attacked it


def test_square_initialisations_and_query_counts(net2d: nn.Module, data2d: tuple[Tensor, Tensor]) -> None:
    x = torch.full((4, 1, SIDE, SIDE), 0.5)  # away from the clip range
    with torch.no_grad():
        y = (net2d(x) > 0).long()  # correctly classified, so attacked
    r = square_attack_result(net2d, x, y, 0.1, norm="linf", queries=1, generator=_gen())
    delta = r.x_adv - x
    assert torch.allclose(delta.abs(), torch.full_like(delta, 0.1))  # ±ε everywhere ...
    assert torch.equal(delta, delta[:, :, :1, :].expand_as(delta))  # ... in vertical stripes
    r = square_attack_result(net2d, x, y, 0.5, norm="l2", queries=1, generator=_gen())
    assert torch.allclose(_size(r.x_adv - x, "l2"), torch.full((4,), 0.5, dtype=torch.float64), atol=1e-5)
    # queries: only unbroken samples are queried; the unbroken ones spend the whole budget
    xt, yt = data2d
    r = square_attack_result(net2d, xt, yt, 0.06, queries=200, generator=_gen())
    assert (r.queries >= 1).all() and (r.queries <= 200).all()
    assert (r.queries[~r.broken] == 200).all()
    assert r.broken.any() and (r.queries[r.broken] < 200).all()
    # the p schedule of the reference, rescaled to the budget
    assert p_selection(0.05, 0, 1000) == 0.05 and p_selection(0.05, 2, 1000) == 0.025
    assert p_selection(0.05, 999, 1000) == 0.05 / 512
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


# ---------------------------------------------------------------------------------------------------
# strength


@pytest.mark.parametrize(("norm", "mid", "huge"), [("linf", 0.06, 0.3), ("l2", 0.8, 4.0)])
def test_apgd_at_least_as_strong_as_pgd(
    net2d: nn.Module, data2d: tuple[Tensor, Tensor], norm: str, mid: float, huge: float
) -> None:
    x, y = data2d
    # measured on this fixture: PGD-100 and APGD-100 both 0.52 (L∞ 0.06) / 0.52 (L2 0.8)
    _, b_pgd = pgd(net2d, x, y, mid, norm=norm, steps=100, loss="ce", generator=_gen())
    _, b_apgd = apgd(net2d, x, y, mid, norm=norm, steps=100, loss="ce", generator=_gen())
    assert 0.25 <= _robust(b_pgd) <= 0.75  # an ε with room either way
    assert _robust(b_apgd) <= _robust(b_pgd) + 1 / len(y)
    _, b_margin = apgd(net2d, x, y, mid, norm=norm, steps=100, loss="margin", generator=_gen())
    assert _robust(b_margin) <= _robust(b_pgd) + 1 / len(y)
    _, b_huge = apgd(net2d, x, y, huge, norm=norm, steps=100, generator=_gen())
    assert _robust(b_huge) <= 0.05  # measured: 0.0


class Scaled(nn.Module):
    """The same classifier with its logit multiplied by ``k``: same decisions, confident margins."""

    def __init__(self, net: nn.Module, k: float) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x) * self.k
        return out


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.06), ("l2", 0.8)])
def test_apgd_ce_keeps_its_gradient_on_confident_binary_logits(
    net2d: nn.Module, data2d: tuple[Tensor, Tensor], norm: str, eps: float
) -> None:
    """Margins up to ~45: BCE's fp32 backward (sigmoid(z) − y) rounds to 0 there, softplus(margin)'s
    does not. Measured: APGD-CE = APGD-margin = 0.52 (PGD-CE through BCE: 0.67 / 0.69)."""
    x, y = data2d
    model = Scaled(net2d, 4.0).eval()
    _, b_ce = apgd(model, x, y, eps, norm=norm, loss="ce", generator=_gen())
    _, b_margin = apgd(model, x, y, eps, norm=norm, loss="margin", generator=_gen())
    assert _robust(b_ce) <= _robust(b_margin) + 1 / len(y)


def test_apgd_restarts_early_stop_chunks_and_bf16(net2d: nn.Module, data2d: tuple[Tensor, Tensor]) -> None:
    x, y = data2d
    eps = 0.05
    _, one = apgd(net2d, x, y, eps, steps=30, generator=_gen())
    _, two = apgd(net2d, x, y, eps, steps=30, restarts=2, generator=_gen())
    assert not (one & ~two).any()  # restart 1 of two is the 1-restart attack
    x_full, full = apgd(net2d, x, y, eps, steps=30, generator=_gen(), early_stop=False)
    assert (one ^ full).sum() <= 1  # same trajectories until a sample breaks
    assert torch.equal(full, predict_broken(net2d, x_full, y))
    x_chunk, chunked = apgd(net2d, x, y, eps, steps=30, generator=_gen(), batch_size=10)
    assert torch.equal(chunked, predict_broken(net2d, x_chunk, y)) and abs(_robust(chunked) - _robust(one)) <= 0.15
    x_bf, bf = apgd(net2d, x, y, eps, steps=30, generator=_gen(), autocast=True)
    assert torch.equal(bf, predict_broken(net2d, x_bf, y))  # fp32 verdicts
    assert (_size(x_bf - x, "linf") <= eps + 1e-6).all()
    assert abs(_robust(bf) - _robust(one)) <= 0.15


# ---------------------------------------------------------------------------------------------------
# the ensemble and gradient masking


@pytest.mark.parametrize("front", [RoundingLayer, SaturatingFront])
def test_ensemble_flags_gradient_masking(
    net2d: nn.Module, data2d: tuple[Tensor, Tensor], front: type[nn.Module]
) -> None:
    x, y = data2d
    model = front(net2d).eval()
    eps = 0.1
    assert _robust(predict_broken(model, x, y)) >= 0.95  # the masked model still classifies
    # measured: PGD and APGD 1.00 on both fronts (zero gradients); Square 0.02 / 0.00
    _, b_pgd = pgd(model, x, y, eps, steps=100, loss="both", generator=_gen(), early_stop=True)
    _, b_apgd = apgd(model, x, y, eps, steps=100, generator=_gen())
    assert _robust(b_pgd) >= 0.9 and _robust(b_apgd) >= 0.9
    ens = attack_ensemble(model, x, y, eps, square_queries=1000, generator=_gen())
    assert isinstance(ens, EnsembleResult)
    assert ens.robust_accuracy <= 0.5  # measured: 0.02 / 0.00 (47 / 48 samples flagged)
    assert ens.masking_suspect and ens.broken_by["square"].any()
    assert torch.equal(ens.masking, ens.broken_by["square"])
    assert not (ens.masking & (ens.broken_by["pgd"] | ens.broken_by["apgd-ce"] | ens.broken_by["apgd-margin"])).any()
    summary = ens.to_dict()
    assert summary["masking_suspect"] is True
    assert summary["masked_samples"] == ens.masking.nonzero().flatten().tolist()


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.06), ("l2", 0.8)])
def test_ensemble_on_the_plain_model(net2d: nn.Module, data2d: tuple[Tensor, Tensor], norm: str, eps: float) -> None:
    x, y = data2d
    ens = attack_ensemble(net2d, x, y, eps, norm=norm, steps=50, square_queries=500, generator=_gen())
    assert int(ens.masking.sum()) <= 1  # measured: 0 (Square finds nothing the gradients missed)
    assert torch.equal(ens.broken, predict_broken(net2d, ens.x_adv, y))
    assert (_size(ens.x_adv - x, norm) <= eps * (1 + 1e-6)).all()
    _, b_pgd = pgd(net2d, x, y, eps, norm=norm, steps=50, loss="both", generator=_gen(), early_stop=True)
    assert ens.robust_accuracy <= _robust(b_pgd) + 1e-9  # PGD runs first on the same samples
    assert 0.2 <= ens.robust_accuracy <= 0.8
    # bookkeeping: each member attacks the survivors of the previous ones; the credits partition
    hits = list(ens.broken_by.values())
    assert list(ens.broken_by) == ["pgd", "apgd-ce", "apgd-margin", "square"]
    union = ~ens.clean_correct
    for name, hit in ens.broken_by.items():
        assert torch.equal(ens.attacked[name], ~union)
        assert not (hit & union).any()
        union = union | hit
    assert torch.equal(union, ens.broken) and sum(int(h.sum()) for h in hits) == int(ens.broken.sum())
    summary = json.loads(json.dumps(ens.to_dict()))
    assert summary["n"] == 48 and summary["per_attack"]["pgd"]["attacked"] == 48
    assert summary["robust_accuracy"] == pytest.approx(ens.robust_accuracy)


def test_ensemble_members_per_sample_eps_and_other_models(
    net_two: nn.Module, net3d: nn.Module, data2d: tuple[Tensor, Tensor], data3d: tuple[Tensor, Tensor]
) -> None:
    x, y = data2d
    eps = torch.linspace(0.0, 0.1, len(y))
    ens = attack_ensemble(net_two, x, y, eps, attacks=["square", "apgd-ce"], steps=20, square_queries=100,
                          generator=_gen())
    assert list(ens.broken_by) == ["apgd-ce", "square"]  # always in the AutoAttack order
    assert (_size(ens.x_adv - x, "linf") <= eps.double() + 1e-6).all()
    assert not ens.broken[0] and torch.equal(ens.x_adv[0], x[0])  # ε = 0 (clean-correct)
    assert isinstance(ens.to_dict()["eps"], list)
    x3, y3 = data3d
    ens3 = attack_ensemble(net3d, x3, y3, 0.8, norm="l2", steps=20, square_queries=100, generator=_gen())
    assert torch.equal(ens3.broken, predict_broken(net3d, ens3.x_adv, y3))
    assert (_size(ens3.x_adv - x3, "l2") <= 0.8 * (1 + 1e-6)).all()
    only_square = attack_ensemble(net3d, x3, y3, 0.1, attacks=("square",), square_queries=50, generator=_gen())
    assert not only_square.masking_suspect  # no gradient member to compare with


def test_sweep_reuses_earlier_pgd_outputs_and_the_masking_check_needs_both_kinds(
    net2d: nn.Module, data2d: tuple[Tensor, Tensor]
) -> None:
    x, y = data2d
    x, y = x[:16], y[:16]
    eps = [0.03, 0.06]
    prior = {e: pgd(net2d, x, y, e, steps=30, loss="both", generator=_gen(), early_stop=True)[0] for e in eps}
    runs = ensemble_sweep(net2d, x, y, eps, pgd_x_adv=prior, steps=30, square_queries=100, generator=_gen())
    for e in eps:
        # the pgd member is exactly the earlier run's verdict, re-decided in fp32
        assert torch.equal(runs[e].broken_by["pgd"], predict_broken(net2d, prior[e], y) & runs[e].clean_correct)
        assert (_size(runs[e].x_adv - x, "linf") <= e * (1 + 1e-6)).all()
    assert runs[0.06].robust_accuracy <= runs[0.03].robust_accuracy
    ok = check_gradient_masking(runs)
    assert ok["name"] == "gradient_masking" and ok["passed"] is (sum(ok["detail"]["masked"]) == 0)
    no_square = ensemble_sweep(net2d, x, y, eps, attacks=["pgd"], steps=10, generator=_gen())
    unchecked = check_gradient_masking(no_square)
    assert unchecked["passed"] is False and "not checked" in unchecked["detail"]["message"]
    with pytest.raises(AttackError, match="no PGD outputs"):
        ensemble_sweep(net2d, x, y, [0.03, 0.1], pgd_x_adv=prior, steps=5, generator=_gen())


def test_ensemble_verification_catches_a_budget_bug(
    net2d: nn.Module, data2d: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = data2d
    x, y = x[:6], y[:6]

    def leaky(model: nn.Module, xs: Tensor, ys: Tensor, es: Tensor, **kwargs: object) -> SquareResult:
        # a "Square" that breaks every sample by stepping far outside the ε-ball
        bad = (xs + 0.4 * (1 - 2 * ys.float()).reshape(-1, 1, 1, 1)).clamp(0, 1)
        return SquareResult(bad, predict_broken(model, bad, ys), torch.ones(len(ys), dtype=torch.long))

    monkeypatch.setattr(ensemble_module, "square_attack_result", leaky)
    with pytest.raises(AttackError, match="square"):
        attack_ensemble(net2d, x, y, 0.01, steps=5, generator=_gen())


# ---------------------------------------------------------------------------------------------------
# arguments


def test_bad_arguments_raise(net2d: nn.Module, data2d: tuple[Tensor, Tensor]) -> None:
    x, y = data2d
    x, y = x[:4], y[:4]
    bad_apgd = [{"norm": "l1"}, {"loss": "dlr"}, {"loss": "both"}, {"steps": 0}, {"restarts": 0}, {"rho": 0.0},
                {"batch_size": 0}]
    for kwargs in bad_apgd:
        with pytest.raises(AttackError):
            apgd(net2d, x, y, 0.1, **kwargs)  # type: ignore[arg-type]
    for kwargs in [{"norm": "l1"}, {"queries": 0}, {"p_init": 0.0}, {"p_init": 1.5}]:
        with pytest.raises(AttackError):
            square_attack(net2d, x, y, 0.1, **kwargs)  # type: ignore[arg-type]
    bad_ens = [{"norm": "l0"}, {"attacks": ["fgsm"]}, {"attacks": []}, {"attacks": ["pgd", "pgd"]},
               {"attacks": "square"}, {"steps": 0}, {"restarts": 0}, {"square_queries": 0}]
    for kwargs in bad_ens:
        with pytest.raises(AttackError):
            attack_ensemble(net2d, x, y, 0.1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(AttackError):
        apgd(net2d, x, y, -0.1)
    with pytest.raises(AttackError):
        square_attack(net2d, x * 3, y, 0.1)  # outside the clip range

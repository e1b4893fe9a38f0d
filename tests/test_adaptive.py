"""Adaptive training (shen 2020, Algorithm 2): only successfully attacked training samples are
added, test samples never are, an unbreakable model stops early, the records carry the rows of
Tables 4-5, runs are deterministic, and bad arguments are ConfigErrors.

A tiny nodule3d (width 4) on 16³ phantom cubes; its output bias is centred on the median logit so
that the NPS attacks flip some samples (an untrained model otherwise predicts one class for all).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import ctharden.hardening.adaptive as adaptive_mod
from ctharden.attacks.nps import InputMap
from ctharden.config.robustness import parse_settings
from ctharden.core.errors import ConfigError, DataError
from ctharden.data.arrays import ArraySet
from ctharden.hardening.adaptive import (
    PAPER_TABLE4_TRAIN,
    AdaptiveResult,
    BaselineLoss,
    adaptive_train,
    default_evaluator,
)
from ctharden.models import build_model
from ctharden.training.losses import training_loss

SIZE = 16
N = 24
N_TRAIN = 16
SETTINGS = parse_settings({
    "mas_levels": [10, 100],
    "random": {"k": 2},
    "optimized": {"restarts": 1, "n_iter": 3, "autocast": False},
    "pgd": {"linf": [0.01]},
})


def _no_eval(model: nn.Module, step: int) -> dict[str, dict[str, Any]]:
    return {}


def _label(model: nn.Module, x: Tensor) -> Tensor:
    """fp32 predicted labels (binary logit > 0) in eval mode."""
    was = model.training
    model.eval()
    with torch.no_grad():
        z = model(x).float()
    model.train(was)
    return (z > 0).long()


def make_data(seed: int = 0) -> ArraySet:
    """``N`` cubes in HU: noisy lung with a centred nodule, bigger for label 1; first 16 train."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([i % 2 for i in range(N)])
    hu = -850.0 + 30.0 * torch.randn(N, SIZE, SIZE, SIZE, generator=g)
    c = torch.arange(SIZE) - SIZE / 2 + 0.5
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    r = (zz**2 + yy**2 + xx**2).sqrt()
    for i in range(N):
        rad = 3.0 + 2.0 * float(y[i]) + 2.0 * float(torch.rand(1, generator=g))
        hu[i][r < rad] = 0.0
    split = np.array(["train"] * N_TRAIN + ["test"] * (N - N_TRAIN))
    x = ((hu + 1000.0) / 1400.0).clamp(0.0, 1.0)
    return ArraySet.from_tensors(hu, x, y, split)


def make_model(data: ArraySet, *, centred: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("nodule3d", spatial_dims=3, width=4)
    if centred:
        with torch.no_grad():
            model.net.out.bias -= model(data.x).median()
    return model.eval()


class _Spies:
    """Records what the attacks returned and what the fine-tuning trained on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attacks: list[tuple[Tensor, float, Any]] = []
        self.fits: list[tuple[Tensor, Tensor]] = []
        real_attack, real_fit = adaptive_mod.optimized_nps_attack, adaptive_mod.fit_with

        def attack(model: nn.Module, x: Tensor, mas: float, **kw: Any) -> Any:
            res = real_attack(model, x, mas, **kw)
            self.attacks.append((x.detach().clone(), float(mas), res))
            return res

        def fit(model: nn.Module, loader: Any, method: Any, **kw: Any) -> Any:
            self.fits.append((loader.dataset.x.clone(), loader.dataset.y.clone()))
            return real_fit(model, loader, method, **kw)

        monkeypatch.setattr(adaptive_mod, "optimized_nps_attack", attack)
        monkeypatch.setattr(adaptive_mod, "fit_with", fit)


@pytest.fixture(scope="module")
def run() -> dict[str, Any]:
    """One 2-step run with the default evaluation, spied on."""
    mp = pytest.MonkeyPatch()
    try:
        spies = _Spies(mp)
        data = make_data()
        model = make_model(data)
        before = copy.deepcopy(model)
        snapshots: list[dict[str, Tensor]] = []
        default = default_evaluator(data, SETTINGS, seed=5)

        def evaluate(m: nn.Module, step: int) -> dict[str, dict[str, Any]]:
            snapshots.append({k: v.detach().clone() for k, v in m.state_dict().items()})
            return default(m, step)

        result = adaptive_train(model, data, SETTINGS, n_adapt=2, epochs_per_step=2, seed=1, evaluate=evaluate)
    finally:
        mp.undo()
    return {"result": result, "data": data, "before": before, "spies": spies, "snapshots": snapshots}


def test_adds_exactly_the_successful_attacks_of_the_first_step(run: dict[str, Any]) -> None:
    result: AdaptiveResult = run["result"]
    data: ArraySet = run["data"]
    before: nn.Module = run["before"]
    first = result.steps[1]
    assert first.n_added > 0, "the fixture must produce some flips"
    # the attacks of step 1 (one per mAs level), on the untouched model
    step1 = run["spies"].attacks[: len(SETTINGS.mas_levels)]
    reported = {mas: int(res[mas].sar.sum() * res.k) for _, mas, res in step1}
    assert first.added_per_mas == reported
    assert first.n_added == first.n_flips == sum(reported.values())
    assert first.n_attempts == N_TRAIN * len(SETTINGS.mas_levels)

    added = result.added
    sel = np.nonzero(added.step == 1)[0]
    assert len(sel) == first.n_added
    x_new = added.x[torch.from_numpy(sel)]
    src = torch.from_numpy(added.source[sel])
    # every added input is flipped by the model as it was before any fine-tuning ...
    flipped = _label(before, x_new) != _label(before, data.x[src])
    assert bool(flipped.all())
    np.testing.assert_array_equal(added.perturbed_pred[sel], _label(before, x_new).numpy())
    # ... is x + p for the attack's own perturbation p, and carries the ground-truth label
    imap = InputMap(before, None)
    for (x_hu, mas, res) in step1:
        rows = sel[added.mas[sel] == mas]
        train_pos = np.searchsorted(result.train_indices, added.source[rows])
        p = res.perturbations[mas][torch.from_numpy(train_pos), torch.from_numpy(added.restart[rows])]
        expect = imap(x_hu[torch.from_numpy(train_pos)], p)
        torch.testing.assert_close(added.x[torch.from_numpy(rows)], expect)
        # and no unflipped chain was added
        flips = np.nonzero(res[mas].flipped_any)[0]
        assert sorted(train_pos.tolist()) == flips.tolist()
    torch.testing.assert_close(added.y[torch.from_numpy(sel)], data.y[src])


def test_test_samples_never_enter_the_training_set(run: dict[str, Any]) -> None:
    result: AdaptiveResult = run["result"]
    data: ArraySet = run["data"]
    train_idx = data.indices("train")
    np.testing.assert_array_equal(result.train_indices, train_idx)
    assert set(result.added.source.tolist()) <= set(train_idx.tolist())
    # the attacks only ever saw the training cubes
    for x_hu, _, _ in run["spies"].attacks:
        torch.testing.assert_close(x_hu, data.raw[torch.from_numpy(train_idx)])
    # what each fine-tuning trained on: the training split, then the added elements, nothing else
    test_x = data.x[torch.from_numpy(data.indices("test"))].flatten(1)
    n_added = 0
    for (sx, sy), step in zip(run["spies"].fits, result.steps[1:], strict=True):
        n_added += step.n_added
        assert len(sx) == step.n_total == N_TRAIN + n_added
        torch.testing.assert_close(sx[:N_TRAIN], data.x[torch.from_numpy(train_idx)])
        torch.testing.assert_close(sx[N_TRAIN:], result.added.x[:n_added])
        torch.testing.assert_close(sy[N_TRAIN:], data.y[torch.from_numpy(result.added.source[:n_added])])
        assert torch.cdist(sx.flatten(1), test_x).min() > 0  # no test cube anywhere in S


def test_records_have_the_table_rows(run: dict[str, Any]) -> None:
    result: AdaptiveResult = run["result"]
    steps = result.steps
    assert [s.step for s in steps] == list(range(len(steps)))
    assert steps[0].label == "w/o adaptive training" and steps[0].n_added == 0 and steps[0].n_total == N_TRAIN
    # step 0 is evaluated before any fine-tuning
    initial = run["before"].state_dict()
    assert all(torch.equal(run["snapshots"][0][k], v) for k, v in initial.items())
    for s in steps:
        if s.stopped:
            assert s.evaluation is None
            continue
        assert set(s.evaluation) == {"train", "test"}
        for split, row in s.evaluation.items():
            assert row["n"] == (N_TRAIN if split == "train" else N - N_TRAIN)
            assert row["auc"] is None or 0.0 <= row["auc"] <= 1.0
            for attack in ("random", "optimized"):
                assert list(row[attack]) == [10.0, 100.0]
                assert all(0.0 <= v <= 100.0 for v in row[attack].values())
        assert s.seconds["total"] >= 0
    for s in steps[1:]:
        if not s.stopped:
            assert len(s.history) == 2 and "loss" in s.history[0]
    totals = np.cumsum([s.n_added for s in steps])
    assert [s.n_total for s in steps] == (N_TRAIN + totals).tolist()
    rows = result.rows("test")
    assert [r["label"] for r in rows] == [s.label for s in steps if s.evaluation is not None]
    md = result.tables()
    assert "Table 4" in md and "Table 5" in md and "1 step adaptive training" in md
    assert "59.2 ± 6.3" in md and "19.3 ± 5.1" in md  # the paper's rows for reference
    assert PAPER_TABLE4_TRAIN["rows"][2][2][2] == (10.8, 1.7)
    json.dumps(result.to_dict())


def test_unbreakable_model_adds_nothing_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_data()
    model = make_model(data, centred=False)
    with torch.no_grad():  # constant output: no perturbation can change the label
        model.net.out.weight.zero_()
        model.net.out.bias.fill_(3.0)
    state = copy.deepcopy(model.state_dict())
    spies = _Spies(monkeypatch)
    result = adaptive_train(model, data, SETTINGS, n_adapt=3, epochs_per_step=1, seed=0, evaluate=_no_eval)
    assert len(result.steps) == 2 and result.steps[1].stopped
    assert result.steps[1].n_added == result.steps[1].n_flips == 0 and result.steps[1].n_total == N_TRAIN
    assert len(result.added) == 0 and spies.fits == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert "P empty" in result.tables()


def test_only_correct_skips_misclassified_samples() -> None:
    data = make_data()
    model = make_model(data)
    before = copy.deepcopy(model)
    all_flips = adaptive_train(copy.deepcopy(model), data, SETTINGS, n_adapt=1, epochs_per_step=1, seed=2,
                               evaluate=_no_eval)
    result = adaptive_train(model, data, SETTINGS, n_adapt=1, epochs_per_step=1, seed=2, evaluate=_no_eval,
                            only_correct=True)
    src = torch.from_numpy(result.added.source)
    assert bool((_label(before, data.x[src]) == data.y[src]).all())
    keep = all_flips.added.clean_pred == data.y.numpy()[all_flips.added.source]
    assert result.steps[1].n_added == int(keep.sum()) <= result.steps[1].n_flips


def test_restarts_add_every_successful_chain() -> None:
    data = make_data()
    model = make_model(data)
    before = copy.deepcopy(model)
    result = adaptive_train(model, data, SETTINGS, n_adapt=1, epochs_per_step=1, seed=4, restarts=2,
                            evaluate=_no_eval)
    step = result.steps[1]
    assert step.n_attempts == N_TRAIN * 2 * 2 and step.n_added == step.n_flips > 0
    assert set(result.added.restart.tolist()) <= {0, 1}
    src = torch.from_numpy(result.added.source)
    assert bool((_label(before, result.added.x) != _label(before, data.x[src])).all())
    # (sample, mAs, restart) identifies one chain: no chain is added twice
    keys = set(zip(result.added.source.tolist(), result.added.mas.tolist(), result.added.restart.tolist(), strict=True))
    assert len(keys) == len(result.added)


def test_deterministic_given_seed() -> None:
    data = make_data()
    runs = []
    for _ in range(2):
        model = make_model(data)
        res = adaptive_train(model, data, SETTINGS, n_adapt=2, epochs_per_step=1, seed=3, evaluate=_no_eval)
        runs.append((res, model.state_dict()))
    (a, sa), (b, sb) = runs
    np.testing.assert_array_equal(a.added.source, b.added.source)
    torch.testing.assert_close(a.added.x, b.added.x, rtol=0, atol=0)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_baseline_loss_is_the_training_loss() -> None:
    data = make_data()
    model = make_model(data)
    x, y = data.x[:6], data.y[:6]
    target = torch.arange(6, dtype=torch.float32)  # ignored by logit models
    for loss in ("mse", "ce"):
        value, stats = BaselineLoss("logit", loss, target)(model, x, y, torch.arange(6))
        torch.testing.assert_close(value, training_loss(model(x), y, target, "logit", loss))
        assert 0.0 <= stats["accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_adapt": 0}, "n_adapt"),
        ({"n_adapt": True}, "n_adapt"),
        ({"epochs_per_step": 0}, "epochs_per_step"),
        ({"restarts": 0}, "restarts"),
        ({"batch_size": 0}, "batch_size"),
        ({"loss": "hinge"}, "loss"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"mas_levels": []}, "mas_levels"),
        ({"mas_levels": [10, 10]}, "duplicates"),
        ({"mas_levels": [-5]}, "positive"),
        ({"target": torch.zeros(3)}, "target"),
        ({"only_correct": 1}, "only_correct"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict[str, Any], match: str) -> None:
    data = make_data()
    with pytest.raises(ConfigError, match=match):
        adaptive_train(make_model(data), data, SETTINGS, evaluate=_no_eval, **kwargs)


def test_bad_model_and_data() -> None:
    data = make_data()
    rating = build_model("nodule3d_fiveclass", spatial_dims=3, width=4)
    with pytest.raises(ConfigError, match="loss"):
        adaptive_train(rating, data, SETTINGS, loss="ce", evaluate=_no_eval)
    with pytest.raises(ConfigError, match="target"):
        adaptive_train(rating, data, SETTINGS, loss="mse", evaluate=_no_eval)
    with pytest.raises(ConfigError, match="ArraySet"):
        adaptive_train(make_model(data), (data.x, data.y), SETTINGS, evaluate=_no_eval)  # type: ignore[arg-type]
    only_test = ArraySet.from_tensors(data.raw, data.x, data.y, ["test"] * N)
    with pytest.raises(DataError, match="train"):
        adaptive_train(make_model(data), only_test, SETTINGS, evaluate=_no_eval)

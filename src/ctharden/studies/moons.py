"""ma 2020, section 3.1 and appendix Table 1: IMA vs "ce" vs "adv ε" on the two-moons data.

Protocol (the paper's, unless marked *ours*):

- Data: :func:`sklearn.datasets.make_moons`, 20000 train / 2000 validation / 2000 test points in
  the raw 2-D coordinates (no scaling; ε is in those units). *Ours:* the Gaussian ``noise`` of
  ``make_moons`` — the paper does not state it. We use :data:`DEFAULT_NOISE` = 0.05: the two classes
  are then separable (closest points of the two moon curves are ~0.5 apart, so 2·0.05 noise rarely
  crosses), which matches the paper's clean accuracy of 1.0 for "ce" and IMA on 2000 test points,
  while noise 0.1 already puts a few points on the wrong side. All three splits come from one
  ``make_moons(n_train + n_val + n_test, noise, random_state=seed)`` call, shuffled, cut in order.
- Model: ``Linear(2,32)-LR-Linear(32,64)-LN-LR-Linear(64,128)-LN-LR-Linear(128,2)`` (LR = leaky ReLU,
  LN = LayerNorm), two class logits (:func:`moons_mlp`).
- Training: 30 epochs, batch 128, Adam with default parameters, ε_max = 0.3 (L∞). Every method
  starts from the same initial weights (``torch.manual_seed(seed)`` before building the model) and
  sees the same batch order. IMA: β = 0.5, N_PGD = 20, N_binary = 10, Δε = ε_max/epochs
  (:func:`ctharden.hardening.ima.fit`); "adv ε": 20-PGD, α = 4, ε = ε_max; TRADES: β = 6, the same PGD;
  "rand ε": uniform L∞ noise of radius ε_max (not in the paper). No input clipping (the inputs
  are unbounded). *Ours:* the final model is evaluated (the validation set's clean accuracy is
  reported, not used for model selection — the paper does not say it selects).
- Evaluation: accuracy on the test set under L∞ 100-PGD at ε = 0, 0.05, ..., 0.3, each attack run
  twice (cross-entropy and margin loss; a sample counts as broken if either run breaks it), as in
  the paper (advertorch's PGD with both losses).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ctharden.attacks.pgd import eps_grid, robust_accuracy_curve
from ctharden.core.errors import ConfigError
from ctharden.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ctharden.hardening import ima
from ctharden.hardening.ima import suggest_eps
from ctharden.hardening.objectives import AdvPGD, BatchLoss, CleanCE, RandNoise, Trades, fit_with
from ctharden.reporting.plots import png_bytes

METHODS = ("ce", "adv", "ima", "trades", "rand")
DEFAULT_NOISE = 0.05  # make_moons noise (std of the Gaussian added to each coordinate); our choice
PAPER_EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
# ma 2020, appendix C, Table 1 "Results on Moons dataset (L-inf norm-defined noise level)":
# the PAPER's numbers (accuracy on its 2000 test points at each noise level of PAPER_EPS), kept as
# reference constants only. Its "adv" row is "adv ε" at ε = ε_max = 0.3 ("adv0.3" in the text).
PAPER_TABLE1: dict[str, tuple[float, ...]] = {
    "IMA": (1.0, 0.999, 0.9975, 0.9915, 0.9755, 0.927, 0.823),
    "MMA": (1.0, 0.9985, 0.993, 0.957, 0.882, 0.772, 0.597),
    "TRADES": (0.996, 0.9805, 0.9575, 0.936, 0.906, 0.875, 0.8255),
    "adv0.3": (0.9975, 0.985, 0.957, 0.9365, 0.9095, 0.883, 0.822),
    "ce": (1.0, 1.0, 0.9975, 0.9855, 0.935, 0.7995, 0.606),
}
PAPER_SOURCE = "ma et al. 2020 (IMA), appendix C, Table 1"


# ---------------------------------------------------------------------------------------------------
# data and model


def moons_mlp() -> nn.Sequential:
    """The paper's Moons MLP: input ``(N, 2)`` coordinates -> ``(N, 2)`` class logits."""
    return nn.Sequential(
        nn.Linear(2, 32), nn.LeakyReLU(),
        nn.Linear(32, 64), nn.LayerNorm(64), nn.LeakyReLU(),
        nn.Linear(64, 128), nn.LayerNorm(128), nn.LeakyReLU(),
        nn.Linear(128, 2),
    )


def moons_splits(n_train: int, n_val: int, n_test: int, noise: float, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train"|"val"|"test": (x (n, 2) fp32, y (n,) int64)}`` from one seeded ``make_moons`` call."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n_train + n_val + n_test, noise=noise, shuffle=True, random_state=seed)
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    cuts = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(x))}
    return {k: (xt[a:b].contiguous(), yt[a:b].contiguous()) for k, (a, b) in cuts.items()}


def method_label(method: str, eps_max: float) -> str:
    """Display name of a method, the paper's spelling (``adv0.3``, ``IMA``, ...)."""
    return {"ce": "ce", "adv": f"adv{eps_max:g}", "ima": "IMA", "trades": "TRADES", "rand": f"rand{eps_max:g}"}[method]


def paper_row(method: str, eps_max: float) -> str | None:
    """The key of the method's row in :data:`PAPER_TABLE1`, None if the paper has no such row."""
    label = method_label(method, eps_max)
    return label if label in PAPER_TABLE1 else None


# ---------------------------------------------------------------------------------------------------
# validation


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    names = tuple(str(m).strip().lower() for m in methods)
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ConfigError(f"unknown Moons method(s) {bad or list(names)} (expected a comma-separated subset of: "
                          f"{', '.join(METHODS)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"Moons methods must not repeat, got {list(names)}")
    return names


# ---------------------------------------------------------------------------------------------------
# training and evaluation


def train_method(
    method: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    eps_max: float,
    n_pgd: int = 20,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[list[dict[str, float]], Tensor | None]:
    """Train ``model`` in place with ``method``; returns ``(per-epoch history, IMA margins or None)``.

    ``x`` ``(N, 2)``, ``y`` ``(N,)``; ``eps_max`` in input units (L∞). The batch order comes from a
    generator seeded with ``seed`` (the same for every method); IMA's margins are ``(N,)`` fp32.
    """

    ds = TensorDataset(x, y, torch.arange(len(x)))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    history: list[dict[str, float]] = []
    if method == "ima":
        _, margins = ima.fit(model, loader, eps_max=eps_max, norm="linf", epochs=epochs, n_pgd=n_pgd, clip=None,
                             device=device, on_epoch=lambda _e, rec: history.append(rec))
        return history, margins
    losses: dict[str, Callable[[], BatchLoss]] = {
        "ce": lambda: CleanCE(),
        "adv": lambda: AdvPGD(eps_max, norm="linf", n_pgd=n_pgd, clip=None),
        "trades": lambda: Trades(eps_max, norm="linf", n_pgd=n_pgd, clip=None),
        "rand": lambda: RandNoise(eps_max, norm="linf", clip=None),
    }
    history = fit_with(model, loader, losses[method](), epochs=epochs, device=device)
    return history, None


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], *, steps: int = 100,
                    seed: int = 0) -> list[float]:
    """Accuracy under L∞ ``steps``-PGD (CE and margin loss, no clipping) at each ε of ``eps`` (sorted,
    with 0); the attack's random starts come from ``torch.manual_seed(seed)``."""

    torch.manual_seed(seed)
    curve = robust_accuracy_curve(model, x, y, list(eps), norm="linf", steps=steps, loss="both", clip=None)
    return [float(a) for a in curve["accuracy"]]


def _clean_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    if len(x) == 0:
        return float("nan")
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ---------------------------------------------------------------------------------------------------
# outputs


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def table_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the accuracy table: each of our methods followed by the paper's row for
    it (where the paper has one and ``ε_max`` = 0.3), then the paper's rows for methods not run here."""
    eps = results["eps"]
    header = ["method"] + [f"{e:g}" for e in eps]
    eps_max = results["config"]["eps_max"]
    rows: list[list[str]] = []
    shown: set[str] = set()

    def paper(key: str) -> list[str]:
        vals = dict(zip(PAPER_EPS, PAPER_TABLE1[key], strict=True))
        return [f"paper: {key}"] + [_fmt(vals.get(round(e, 6))) for e in eps]

    for m, res in results["methods"].items():
        rows.append([f"ours: {res['label']}"] + [_fmt(a) for a in res["accuracy"]])
        key = paper_row(m, eps_max) if math.isclose(eps_max, 0.3) else None
        if key:
            rows.append(paper(key))
            shown.add(key)
    for key in PAPER_TABLE1:
        if key not in shown:
            rows.append(paper(key))
    return header, rows


def markdown_table(results: Mapping[str, Any]) -> str:
    """``table.md``: our accuracies next to the paper's Table 1 (clearly labelled), plus the setup."""
    c = results["config"]
    header, rows = table_rows(results)
    lines = [
        "# Moons: L∞ 100-PGD accuracy on the test set (ma 2020, section 3.1 / Table 1)",
        "",
        (f"ours: make_moons noise {c['noise']:g} (our choice; the paper does not state it), "
         f"{c['n_train']} train / {c['n_val']} val / {c['n_test']} test points, {c['epochs']} epochs, "
         f"batch {c['batch_size']}, Adam (default), ε_max {c['eps_max']:g}, N_PGD {c['n_pgd']}, seed {c['seed']}; "
         f"PGD {c['eval_steps']} steps with CE and margin loss, no clipping."),
        (f"\"paper: ...\" rows are the published numbers of {PAPER_SOURCE} (20000/2000/2000 points), "
         "copied for reference, not measured here."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    for res in results["methods"].values():
        lines.append(f"- {res['label']}: train {res['train_seconds']:.1f} s, eval {res['eval_seconds']:.1f} s, "
                     f"validation clean accuracy {_fmt(res['val_clean_accuracy'])}")
    ima = results.get("ima")
    if ima:
        lines.append(f"- IMA margins (L∞, final epoch): mean {ima['margin_mean']:.3f}, "
                     f"median {ima['margin_median']:.3f}, "
                     f"{ima['share_at_eps_max']:.1%} at ε_max; suggested ε {ima['suggested_eps']:.3f}")
    return "\n".join(lines) + "\n"


def plot_decision_boundaries(models: Mapping[str, nn.Module], results: Mapping[str, Any], x: Tensor, y: Tensor,
                             *, max_points: int = 1000, grid: int = 300) -> bytes:
    """PNG bytes: one panel per method, its predicted class on a ``grid``×``grid`` lattice over the
    data's extent (±0.5) with the decision boundary, and up to ``max_points`` test points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xn = x.numpy()
    lo, hi = xn.min(0) - 0.5, xn.max(0) + 0.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid))
    pts = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32))
    show = np.random.default_rng(0).permutation(len(xn))[:max_points]
    y_show = y.numpy()[show]
    eps = results["eps"]
    n = len(models)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (m, model) in zip(axes[0], models.items(), strict=True):
        model.eval()
        with torch.no_grad():
            z = model(pts)
            diff = (z[:, 1] - z[:, 0]).reshape(grid, grid).numpy()
        ax.contourf(gx, gy, (diff > 0).astype(float), levels=[-0.5, 0.5, 1.5], colors=["#f6c9c4", "#c4d7f6"])
        ax.contour(gx, gy, diff, levels=[0.0], colors="k", linewidths=1.0)
        for cls, color in ((0, "#d62728"), (1, "#1f4fb4")):
            sel = show[y_show == cls]
            ax.scatter(xn[sel, 0], xn[sel, 1], s=3, c=color, linewidths=0)
        acc = results["methods"][m]["accuracy"]
        tail = ", ".join(f"ε={e:g}: {a:.3f}" for e, a in list(zip(eps, acc, strict=True))[-2:])
        ax.set_title(f"{results['methods'][m]['label']}  ({tail})", fontsize=9)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.suptitle("Moons: decision regions (red = class 0, blue = class 1) and test points", fontsize=10)
    fig.tight_layout()
    data = png_bytes(fig)
    plt.close(fig)
    return data


def plot_margins(margins: Tensor, eps_max: float, *, bins: int = 30) -> bytes:
    """PNG bytes: histogram of IMA's final margin estimates ``(N,)`` (L∞, input units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(margins.numpy(), bins=bins, range=(0.0, eps_max), color="#1f4fb4")
    ax.set_xlabel("IMA margin estimate (L∞, input units)")
    ax.set_ylabel("training samples")
    ax.set_title(f"IMA's final margins ({len(margins)} samples, ε_max = {eps_max:g})", fontsize=10)
    fig.tight_layout()
    data = png_bytes(fig)
    plt.close(fig)
    return data


# ---------------------------------------------------------------------------------------------------
# the experiment


def run_moons(
    *,
    n_train: int = 20000,
    n_test: int = 2000,
    n_val: int = 2000,
    epochs: int = 30,
    eps_max: float = 0.3,
    batch_size: int = 128,
    noise: float = DEFAULT_NOISE,
    methods: Sequence[str] | str = ("ce", "adv", "ima"),
    eps_eval: Sequence[float] = PAPER_EPS,
    n_pgd: int = 20,
    eval_steps: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    out_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Train each method on the Moons data and measure its L∞ PGD accuracy on the test set.

    Args:
        n_train, n_test, n_val: split sizes (points).
        epochs, batch_size: training schedule (Adam, default parameters).
        eps_max: ε_max (L∞, input units): IMA's largest margin, the ε of "adv"/"trades"/"rand".
        noise: ``make_moons`` noise std (see the module docstring for the choice).
        methods: subset of :data:`METHODS` (a sequence or a comma-separated string).
        eps_eval: evaluation ε values (L∞, input units); sorted, 0 added.
        n_pgd: PGD steps of the training attacks (IMA's BPGD, adv, TRADES).
        eval_steps: PGD steps of the evaluation attack (100 in the paper).
        seed: data, initial weights (the same for every method), batch order and attack starts.
        device: where to train ("cpu" is fastest for this tiny MLP).
        out_dir: if given, writes ``results.json``, ``table.md``, ``decision_boundaries.png`` and
            (when IMA ran) ``margins.png`` there, each atomically.

    Returns:
        The JSON-serialisable results (what ``results.json`` holds): ``config``, ``eps``,
        ``methods`` (per method: ``label``, ``accuracy`` per ε, ``val_clean_accuracy``,
        ``train_seconds``, ``eval_seconds``, ``final_epoch``), ``ima`` (margin statistics, when run),
        ``paper_table1`` and ``files``.

    Raises:
        ConfigError: unknown method or invalid sizes/ε.
    """
    names = _check_methods(methods)
    n_train = _check_int("n_train", n_train, 2)
    n_test = _check_int("n_test", n_test, 1)
    n_val = _check_int("n_val", n_val, 0)
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    n_pgd = _check_int("n_pgd", n_pgd, 1)
    eval_steps = _check_int("eval_steps", eval_steps, 1)
    seed = _check_int("seed", seed, 0)
    if not (isinstance(eps_max, (int, float)) and not isinstance(eps_max, bool) and math.isfinite(eps_max)
            and eps_max > 0):
        raise ConfigError(f"eps_max must be a positive number, got {eps_max!r}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ConfigError(f"noise must be a number >= 0, got {noise!r}")
    eps = eps_grid(eps_eval)
    eps_max, noise = float(eps_max), float(noise)
    dev = torch.device(device)
    t_start = time.perf_counter()

    data = moons_splits(n_train, n_val, n_test, noise, seed)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    models: dict[str, nn.Module] = {}
    per_method: dict[str, dict[str, Any]] = {}
    ima_margins: Tensor | None = None
    for m in names:
        torch.manual_seed(seed)  # the same initial weights (and attack RNG state) for every method
        model = moons_mlp().to(dev)
        t0 = time.perf_counter()
        history, margins = train_method(m, model, xtr.to(dev), ytr.to(dev), epochs=epochs, batch_size=batch_size,
                                        eps_max=eps_max, n_pgd=n_pgd, seed=seed, device=dev)
        t1 = time.perf_counter()
        model = model.cpu().eval()
        acc = robust_accuracy(model, xte, yte, eps, steps=eval_steps, seed=seed)
        t2 = time.perf_counter()
        if margins is not None:
            ima_margins = margins
        models[m] = model
        per_method[m] = {
            "label": method_label(m, eps_max),
            "accuracy": acc,
            "val_clean_accuracy": _clean_accuracy(model, xva, yva) if n_val else None,
            "train_seconds": round(t1 - t0, 2),
            "eval_seconds": round(t2 - t1, 2),
            "final_epoch": {k: float(v) for k, v in history[-1].items()} if history else {},
            "paper_row": paper_row(m, eps_max),
        }

    results: dict[str, Any] = {
        "experiment": "moons (ma 2020, section 3.1)",
        "config": {"n_train": n_train, "n_val": n_val, "n_test": n_test, "epochs": epochs, "eps_max": eps_max,
                   "batch_size": batch_size, "noise": noise, "methods": list(names), "n_pgd": n_pgd,
                   "eval_steps": eval_steps, "eval_norm": "linf", "eval_loss": "both", "seed": seed,
                   "device": str(dev), "torch": torch.__version__},
        "noise_choice": (f"make_moons noise={noise:g}: not stated in the paper (default {DEFAULT_NOISE:g}: "
                         "separable classes, matching the paper's clean accuracy of 1.0)"),
        "eps": eps,
        "methods": per_method,
        "paper_table1": {"source": PAPER_SOURCE, "eps": list(PAPER_EPS),
                         "accuracy": {k: list(v) for k, v in PAPER_TABLE1.items()}},
    }
    if ima_margins is not None:
        counts, edges = np.histogram(ima_margins.numpy(), bins=30, range=(0.0, eps_max))
        results["ima"] = {
            "margin_mean": float(ima_margins.mean()), "margin_median": float(ima_margins.median()),
            "share_at_eps_max": float((ima_margins >= eps_max * (1 - 1e-6)).float().mean()),
            "suggested_eps": suggest_eps(ima_margins, eps_max),
            "histogram": {"counts": counts.tolist(), "edges": [float(e) for e in edges]},
        }
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    files: dict[str, str] = {}
    if out_dir is not None:
        out = Path(out_dir)
        files["table"] = str(atomic_write_text(out / "table.md", markdown_table(results)))
        files["decision_boundaries"] = str(atomic_write_bytes(
            out / "decision_boundaries.png", plot_decision_boundaries(models, results, xte, yte)))
        if ima_margins is not None:
            files["margins"] = str(atomic_write_bytes(out / "margins.png", plot_margins(ima_margins, eps_max)))
        files["results"] = str(out / "results.json")
        results["files"] = files
        atomic_write_json(out / "results.json", results)
    else:
        results["files"] = files
    return results

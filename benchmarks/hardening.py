"""Hardening cost: an IMA epoch vs an "adv ε" epoch at equal N_PGD (20), same model and data.

Every method trains its own copy of the same initial weights (own Adam; lr 1e-4 for the CNN cases,
see :func:`cnn_case`) on the same data in this one process, through the same loop
(:func:`ctharden.hardening.objectives.fit_with`), one epoch per timed call; methods are interleaved
within a round (order rotated each round) after one untimed warm-up epoch each. The reported ratio
is the **median over rounds of the per-round ratio** (a shared machine drifts; a ratio within one
round cancels most of it); seconds are medians.

- "ce": clean cross-entropy (reference for the cost of a plain epoch).
- "adv ε": 20-PGD (α = 4) adversarial training (:class:`~ctharden.hardening.objectives.AdvPGD`).
- IMA: :class:`ctharden.hardening.ima.IMALoss` (BPGD with N_PGD = 20, N_binary = 10, β = 0.5,
  margins updated from the batch's own BPGD, ``margin_update="batch"``), Δε = ε/30 (the paper's
  30 epochs), its margin state carried over from epoch to epoch. Two starting states:
  "IMA (E=Δε)" starts from the initial margins Δε (a small search radius: BPGD mostly runs all 20
  steps without reaching the boundary), "IMA (E=ε)" from margins at ε_max (BPGD stops at the
  boundary wherever the sample's margin is below ε, then 10 bisection forward passes).

IMA attacks only the correctly classified samples, "adv" every sample, so IMA is timed on models
that classify (nearly) everything correctly: each model is first warmed up by a few clean epochs.
Cases: (a) the Moons MLP (ma 2020) on make_moons points (noise 0.05), L∞ ε 0.3, no clipping;
(b) the nodule CNN ``nodule3d`` width 16 on random 32³ cubes and (c) ``resnet18_2d`` on random
112×112 images, both ``0.8·U(0, 1) + 0.2·y`` in [0, 1] with balanced labels ``y`` (a learnable
"brighter = class 1" rule, so that a warmed-up model is right and has a finite margin), L∞ ε 0.03
(model-input units) with clipping to [0, 1]. The column "boundary found" is the share of each
batch for which BPGD found a boundary point within the sample's margin (found early = cheap BPGD
plus 10 bisection forward passes; not found = all 20 steps), next to the share classified right
(only those are attacked by BPGD), both medians over the timed epochs; "acc after" is each copy's
clean accuracy on the data after its last timed epoch.
**Goal: IMA ≤ 1.3× adv per epoch.**

    OMP_WAIT_POLICY=PASSIVE python benchmarks/hardening.py           # ~2-3 min on 2 idle cores
    python benchmarks/hardening.py --quick                           # Moons + nodule CNN, 2 rounds (~40 s)
    python benchmarks/hardening.py --rounds 5 --n-cnn 128 --n-resnet 64   # bigger (e.g. on a GPU)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ctharden.hardening.ima import IMALoss
from ctharden.hardening.objectives import AdvPGD, CleanCE, fit_with
from ctharden.models import build_model
from ctharden.studies.moons import moons_mlp, moons_splits

N_PGD = 20
EPOCHS_FOR_DELTA = 30  # Δε = ε / 30, the paper's schedule


@dataclass
class Case:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    batch: int
    eps: float
    clip: tuple[float, float] | None
    lr: float = 1e-3  # Adam's learning rate of the timed copies (it does not change the cost of an epoch)


def _predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    """Predicted labels ``(N,)`` (eval mode, batches of ``batch``)."""
    from ctharden.attacks.losses import infer_adapter

    model.eval()
    out = []
    with torch.no_grad():
        for xb in x.split(batch):
            z = model(xb.to(device))
            a = infer_adapter(model, z)
            out.append(a.predict(a.canonical(z).float()).cpu())
    return torch.cat(out)


def moons_case(n: int, device: torch.device) -> Case:
    d = moons_splits(n, 0, 0, 0.05, 0)
    x, y = d["train"]
    torch.manual_seed(0)
    model = moons_mlp().to(device)
    loader = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    fit_with(model, loader, CleanCE(), epochs=3, device=device)  # warm-up: a model that is mostly right
    return Case(f"(a) Moons MLP, {n} points", model, x, y, 128, 0.3, None)


def cnn_case(name: str, model: nn.Module, shape: tuple[int, ...], n: int, batch: int, eps: float,
             device: torch.device, warmup: int) -> Case:
    """Random inputs ``0.8·U(0, 1) + 0.2·y`` in [0, 1] (balanced labels ``y``; class 1 brighter), the
    model warmed up by ``warmup`` clean epochs so that it classifies (nearly) every sample correctly."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = 0.8 * torch.rand((n, *shape), generator=g) + 0.2 * y.view(-1, *[1] * len(shape)).float()
    model = model.to(device)
    loader = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    fit_with(model, loader, CleanCE(), epochs=warmup, device=device)
    acc = float((_predict(model, x, device) == y).float().mean())
    # the timed copies go on at Adam lr 1e-4: at 1e-3 even plain CE training of these tiny, random sets
    # oscillates back to one class within a few epochs, and IMA, which attacks only the correctly
    # classified samples, would then be timed on half of its work
    return Case(f"{name} (clean accuracy after warm-up {acc:.0%})", model, x, y, batch, eps, (0.0, 1.0), lr=1e-4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, rounds: int, device: torch.device) -> dict[str, dict]:
    """Time one epoch of each method ``rounds`` times (interleaved); returns per-method stats."""
    n = len(case.x)
    delta = case.eps / EPOCHS_FOR_DELTA
    loader = DataLoader(TensorDataset(case.x, case.y, torch.arange(n)), batch_size=case.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(1))

    def make(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, object]:
        model = copy.deepcopy(case.model)
        opt = torch.optim.Adam(model.parameters(), lr=case.lr)
        if kind == "ce":
            method: object = CleanCE()
        elif kind == "adv":
            method = AdvPGD(case.eps, norm="linf", n_pgd=N_PGD, clip=case.clip)
        else:
            method = IMALoss(n, eps_max=case.eps, delta=delta, norm="linf", beta=0.5, n_pgd=N_PGD, n_binary=10,
                             clip=case.clip, margin_update="batch", loader=loader, device=device)
            if kind == "ima_max":
                method.state.margins.fill_(case.eps)
                method.pending.fill_(case.eps)
        return model, opt, method

    kinds = {"ce": "ce", "adv": f"adv {case.eps:g}", "ima": "IMA (E=Δε)", "ima_max": "IMA (E=ε)"}
    setups = {k: make(k) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    found: dict[str, list[float]] = {"ima": [], "ima_max": []}
    correct: dict[str, list[float]] = {"ima": [], "ima_max": []}

    def epoch(k: str) -> float:
        model, opt, method = setups[k]
        _sync(device)
        t0 = time.perf_counter()
        hist = fit_with(model, loader, method, epochs=1, optimizer=opt, device=device)  # type: ignore[arg-type]
        _sync(device)
        dt = time.perf_counter() - t0
        if k in found:
            found[k].append(hist[-1].get("boundary_found", float("nan")))
            correct[k].append(hist[-1].get("clean_accuracy", float("nan")))
        return dt

    for k in kinds:  # untimed warm-up epoch
        epoch(k)
    order = list(kinds)
    for r in range(rounds):
        rot = order[r % len(order):] + order[: r % len(order)]
        for k in rot:
            times[k].append(epoch(k))
    res: dict[str, dict] = {}
    for k, label in kinds.items():
        ratio_adv = statistics.median(t / a for t, a in zip(times[k], times["adv"], strict=True))
        ratio_ce = statistics.median(t / c for t, c in zip(times[k], times["ce"], strict=True))
        res[k] = {"label": label, "seconds": statistics.median(times[k]), "vs_adv": ratio_adv, "vs_ce": ratio_ce,
                  "found": statistics.median(found[k]) if found.get(k) else None,
                  "correct": statistics.median(correct[k]) if correct.get(k) else None,
                  "acc_after": float((_predict(setups[k][0], case.x, device) == case.y).float().mean())}
    return res


def print_case(case: Case, res: dict[str, dict]) -> list[str]:
    print(f"\n{case.name}: N {len(case.x)}, batch {case.batch}, L∞ ε {case.eps:g}, N_PGD {N_PGD}")
    print(f"  {'method':<14}{'s/epoch':>10}{'x ce':>8}{'x adv':>8}{'acc after':>11}   IMA: right / boundary found")
    for r in res.values():
        f = "" if r["found"] is None else f"{r['correct']:.0%} / {r['found']:.0%}"
        print(f"  {r['label']:<14}{r['seconds']:>10.3f}{r['vs_ce']:>8.2f}{r['vs_adv']:>8.2f}"
              f"{r['acc_after']:>11.0%}   {f}")
    worst = max(res["ima"]["vs_adv"], res["ima_max"]["vs_adv"])
    verdict = "meets" if worst <= 1.3 else "MISSES"
    line = (f"{case.name}: IMA/adv epoch time {res['ima']['vs_adv']:.2f}x (E=Δε), {res['ima_max']['vs_adv']:.2f}x "
            f"(E=ε) -> {verdict} the goal ≤ 1.3x; adv/ce {res['adv']['vs_ce']:.1f}x")
    return [line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Moons and nodule CNN only, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed epochs per method (default 3; quick 2)")
    parser.add_argument("--n-moons", type=int, default=2048, help="Moons training points (default 2048)")
    parser.add_argument("--n-cnn", type=int, default=64, help="nodule CNN cubes (default 64, batch 32)")
    parser.add_argument("--n-resnet", type=int, default=32, help="ResNet-18 images (default 32, batch 16)")
    parser.add_argument("--size", type=int, default=112, help="ResNet-18 image side (default 112)")
    parser.add_argument("--eps-cnn", type=float, default=0.03, help="L∞ ε of the CNN cases (default 0.03)")
    parser.add_argument("--warmup", type=int, default=8, help="clean warm-up epochs of the CNN cases (default 8)")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18 2D")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rounds = max(1, args.rounds or (2 if args.quick else 3))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, device {device} ({name}), {rounds} timed rounds"
          + (f" [OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}]" if os.environ.get("OMP_WAIT_POLICY") else ""))
    t_start = time.perf_counter()

    builders: list[Callable[[], Case]] = [
        lambda: moons_case(args.n_moons, device),
        lambda: cnn_case("(b) nodule3d width 16, random 32³ cubes", _seeded(lambda: build_model(
            "nodule3d", spatial_dims=3, width=16)), (1, 32, 32, 32), args.n_cnn, 32, args.eps_cnn, device,
            args.warmup),
    ]
    if not (args.quick or args.no_resnet):
        builders.append(lambda: cnn_case(f"(c) resnet18_2d, random {args.size}² images", _seeded(lambda: build_model(
            "resnet18_2d", spatial_dims=2, window_hu=None)), (1, args.size, args.size), args.n_resnet, 16, args.eps_cnn,
            device, args.warmup))
    summary: list[str] = []
    for build in builders:
        case = build()
        summary += print_case(case, run_case(case, rounds, device))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s\nsummary:")
    for line in summary:
        print(f"  - {line}")


def _seeded(fn: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return fn()


if __name__ == "__main__":
    main()

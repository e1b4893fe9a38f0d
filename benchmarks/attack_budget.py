"""What each member of the attack ensemble costs and adds, on the trained default models.

The evaluation's defaults rest on two measurements this script repeats (``params.yaml``,
``robustness.defaults.pgd``):

1. ``loss: margin`` instead of ma 2020's CE + margin runs (``both``): for a binary classifier
   CE = softplus(-margin) is a decreasing function of the margin, so from the same random start
   the two runs take the same sign (L∞) or normalised (L2) steps. The table gives, per norm, the
   samples each run broke, the samples *only* the CE run broke, and the seconds of each.
2. ``ensemble_eps: gated``: APGD and Square run at the gated ε only. The second table gives the
   per-sample cost of each member on the samples that survive 100-PGD at the gated ε (the ones
   the later members attack), as a ratio to one 100-step PGD run measured in the same process.

    python benchmarks/attack_budget.py                       # every job, baseline models
    python benchmarks/attack_budget.py --jobs nodule2d --variant hardened --max-samples 64

Run from the repository root after ``dvc repro train`` (it reads ``artifacts/models``). Wall
times drift on shared machines; the ratios are what to compare. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctharden.attacks.apgd import apgd  # noqa: E402
from ctharden.attacks.common import repeat_over_eps  # noqa: E402
from ctharden.attacks.pgd import pgd  # noqa: E402
from ctharden.attacks.square import square_attack_result  # noqa: E402
from ctharden.config.jobs import job_names  # noqa: E402
from ctharden.config.params import load_params  # noqa: E402
from ctharden.config.robustness import RobustnessSettings  # noqa: E402
from ctharden.evaluation.robustness import pgd_samples  # noqa: E402
from ctharden.gate.criteria import gate_settings, gated_eps  # noqa: E402
from ctharden.stages.evaluate import prepare_job  # noqa: E402


def loss_rows(job: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: RobustnessSettings,
              seed: int) -> list[str]:
    """PGD with the CE and with the margin loss from the same starts, every listed ε at once."""
    p = settings.pgd
    rows = []
    for norm in ("linf", "l2"):
        eps = getattr(p, norm)
        if not eps:
            continue
        xs, ys, es = repeat_over_eps(x, y, eps)
        broken, secs = {}, {}
        for loss in ("margin", "ce"):
            torch.manual_seed(seed)  # the same random starts for both runs
            t0 = time.perf_counter()
            _, broken[loss] = pgd(model, xs, ys, es, norm=norm, steps=p.steps, loss=loss, autocast=p.autocast,
                                  early_stop=True)
            secs[loss] = time.perf_counter() - t0
        per = {k: [int(b) for b in v.view(len(eps), -1).sum(1)] for k, v in broken.items()}
        ce_only = [int(b) for b in (broken["ce"] & ~broken["margin"]).view(len(eps), -1).sum(1)]
        rows.append(f"| {job} | {norm} | {', '.join(f'{e:g}' for e in eps)} | {len(x)} | {per['margin']} | "
                    f"{per['ce']} | {ce_only} | {secs['margin']:.1f} | {secs['ce']:.1f} |")
    return rows


def member_rows(job: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: RobustnessSettings,
                seed: int, gated: dict[str, list[float]]) -> list[str]:
    """Per-sample seconds of PGD, APGD-margin and Square on the PGD survivors at each gated ε."""
    p = settings.pgd
    rows = []
    for norm, eps_list in gated.items():
        for eps in eps_list:
            torch.manual_seed(seed)
            _, br = pgd(model, x, y, eps, norm=norm, steps=p.steps, loss=p.loss, autocast=p.autocast, early_stop=True)
            idx = (~br).nonzero().squeeze(1)
            if idx.numel() == 0:
                rows.append(f"| {job} | {norm} | {eps:g} | {len(x)} | 0 | — | — | — | — |")
                continue
            xs, ys = x[idx], y[idx]
            g = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            pgd(model, xs, ys, eps, norm=norm, steps=p.steps, loss=p.loss, autocast=p.autocast, early_stop=True)
            t1 = time.perf_counter()
            _, b_apgd = apgd(model, xs, ys, eps, norm=norm, steps=p.steps, loss="margin", autocast=p.autocast,
                             generator=g)
            t2 = time.perf_counter()
            sq = square_attack_result(model, xs, ys, eps, norm=norm, queries=p.square_queries, generator=g)
            t3 = time.perf_counter()
            t_run, t_apgd, t_sq = t1 - t0, t2 - t1, t3 - t2
            n = int(idx.numel())
            rows.append(f"| {job} | {norm} | {eps:g} | {len(x)} | {n} | {1e3 * t_run / n:.0f} | "
                        f"{t_apgd / t_run:.2f} (broke {int(b_apgd.sum())}) | "
                        f"{t_sq / t_run:.2f} (broke {int(sq.broken.sum())}, {p.square_queries} queries) | "
                        f"{1e3 * (t_run + t_apgd * 2 + t_sq) / n:.0f} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", nargs="*", default=None)
    ap.add_argument("--variant", default="baseline", choices=("baseline", "hardened"))
    ap.add_argument("--max-samples", type=int, default=None, help="test samples per job (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    params = load_params()
    losses, members = [], []
    for job in args.jobs or job_names(params):
        ctx = prepare_job(params, job, args.variant)
        sub = pgd_samples(ctx.data, ctx.settings, ctx.seed)[: args.max_samples]
        x, y = ctx.data.x[sub], ctx.data.y[sub]
        print(f"{job} ({args.variant}): {len(sub)} test samples, input {tuple(x.shape[1:])}", flush=True)
        losses += loss_rows(job, ctx.model, x, y, ctx.settings, args.seed)
        members += member_rows(job, ctx.model, x, y, ctx.settings, args.seed, gated_eps(gate_settings(params, job)))
    print("\n## PGD: margin run vs CE run from the same starts (broken per ε)\n")
    print("| job | norm | ε | N | margin broke | CE broke | only CE broke | margin s | CE s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(losses))
    print("\n## Cost of the later members on the 100-PGD survivors at the gated ε (ratio to one PGD run)\n")
    print("| job | norm | ε | N | PGD survivors | PGD ms/sample | APGD-margin / PGD | Square / PGD "
          "| ensemble ms/sample |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(members))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cross-check of the gated robust accuracy against an independent implementation: torchattacks'
APGD-CE and Square on the samples ctharden's attack ensemble reported as surviving.

The evaluation stores, per sample, which samples the ensemble broke at every ε
(``metrics/outcomes/<variant>/<job>.json``, block ``ensemble_<norm>``). This script loads the
same model and test split (``ctharden.stages.evaluate.prepare_job``: the dataset must be the one
the outcomes were computed on), and attacks every survivor once more with

a. ``torchattacks.APGD`` (loss ``ce``, ``--steps`` iterations, 1 restart; Croce & Hein's own step
   schedule, a different code base from ``ctharden.attacks.apgd``);
b. ``torchattacks.Square`` (margin loss, ``--queries`` queries; torchattacks' Square is 2D only,
   so a 3D volume ``(1, D, H, W)`` is attacked as a ``D``-channel image — squares span every slice,
   still an L∞/L2 perturbation of the same size). torchattacks' APGD, too, takes 4D batches only (a
   5D one gains a leading axis), so it gets the same ``D``-channel view; its norms are over all
   values of a sample, so the ball is the same.

torchattacks needs class logits, so a binary-logit model is wrapped to return ``[-z/2, z/2]``
(softmax CE on these = BCE on ``z``). A sample counts as broken when the fp32 eval-mode prediction
on torchattacks' output is wrong *and* the output lies in the ε-ball and [0, 1] (checked here).

**The claim checked** (issue 14): torchattacks must not find the default models less robust than
ctharden reports, beyond one sample per job, norm and ε. The last column says whether it holds.
The table also gives PGD alone vs the ensemble (robust accuracy, from the metrics) and the seconds
the ensemble added to the evaluation (``pgd.<norm>.ensemble.seconds`` of the metrics).

    pip install --no-deps torchattacks          # for this benchmark only
    python benchmarks/ensemble_crosscheck.py                    # every job and variant, the gated ε
    python benchmarks/ensemble_crosscheck.py --all-eps          # every ε the ensemble ran at
    python benchmarks/ensemble_crosscheck.py --jobs nodule2d --variants hardened --queries 5000

Run from the repository root after ``make run`` (it reads ``artifacts/`` and ``metrics/``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctharden.attacks.pgd import predict_broken  # noqa: E402
from ctharden.config.params import load_params  # noqa: E402
from ctharden.evaluation.headline import ensemble_eps  # noqa: E402
from ctharden.gate.criteria import gate_settings, gated_eps  # noqa: E402
from ctharden.stages.evaluate import prepare_job  # noqa: E402

INSTALL_HINT = "pip install --no-deps torchattacks"
TA_NORM = {"linf": "Linf", "l2": "L2"}
METRICS = {"baseline": "metrics/robustness.json", "hardened": "metrics/robustness_hardened.json"}


class TwoLogits(nn.Module):
    """Binary logit ``z`` ``(N,)`` -> class logits ``[-z/2, z/2]`` ``(N, 2)``; ``rating`` and class
    outputs pass through ``canonical``. ``as_2d``: input ``(N, D, H, W)`` -> the model's
    ``(N, 1, D, H, W)`` (Square on a 3D volume)."""

    def __init__(self, model: nn.Module, as_2d: bool = False) -> None:
        super().__init__()
        self.model, self.as_2d = model, as_2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x.unsqueeze(1) if self.as_2d else x)
        if getattr(self.model, "output", "logit") == "rating":
            z = z - 3.0
        if z.dim() == 2 and z.shape[1] >= 2:
            return z
        z = z.reshape(-1)
        return torch.stack([-z / 2, z / 2], 1)


def _size(d: torch.Tensor, norm: str) -> torch.Tensor:
    f = d.flatten(1).double()
    return f.abs().amax(1) if norm == "linf" else f.norm(dim=1)


def torchattacks_broken(ta: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                        steps: int, queries: int, seed: int) -> dict[str, Any]:
    """Samples of ``x`` ``(N, ...)`` that torchattacks' APGD-CE and Square break (fp32 decisions on
    outputs verified to lie in the ε-ball and [0, 1]); seconds per attack."""
    out: dict[str, Any] = {}
    if x.dim() == int(getattr(model, "spatial_dims", x.dim() - 2)) + 1:  # (N, *spatial): add the channel axis
        x = x.unsqueeze(1)  # torchattacks wants (N, C, H, W) (Square draws per channel)
    three_d = x.dim() == 5
    for name in ("apgd-ce", "square"):
        as_2d = three_d  # torchattacks takes 4D (N, C, H, W): a volume goes in as D channels
        wrapped = TwoLogits(model, as_2d).eval()
        xin = x.squeeze(1) if as_2d else x
        if name == "apgd-ce":
            atk = ta.APGD(wrapped, norm=TA_NORM[norm], eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce")
        else:
            atk = ta.Square(wrapped, norm=TA_NORM[norm], eps=eps, n_queries=queries, n_restarts=1, seed=seed,
                            loss="margin")
        t0 = time.perf_counter()
        xa = atk(xin, y)
        seconds = time.perf_counter() - t0
        xa = xa.unsqueeze(1) if as_2d else xa
        valid = (_size(xa - x, norm) <= eps * (1 + 1e-5) + 1e-7) & (xa.flatten(1).amin(1) >= 0) & (
            xa.flatten(1).amax(1) <= 1)
        broken = predict_broken(model, xa, y) & valid
        out[name] = {"broken": broken, "invalid": int((~valid).sum()), "seconds": seconds}
    return out


def gated(params: dict[str, Any], job: str) -> set[tuple[str, float]]:
    """``(norm, ε)`` of the job's robust-accuracy gate criteria."""
    return {(norm, e) for norm, eps in gated_eps(gate_settings(params, job)).items() for e in eps}


def crosscheck(params: dict[str, Any], job: str, variant: str, ta: Any, steps: int, queries: int | None,
               seed: int, only_gated: bool) -> list[dict[str, Any]]:
    """One row per norm and ε of the job's ensemble outcomes (the gated ε only with ``only_gated``)."""
    outcomes_path = ROOT / "metrics" / "outcomes" / variant / f"{job}.json"
    metrics_path = ROOT / METRICS[variant]
    if not outcomes_path.exists() or not metrics_path.exists():
        print(f"  {job}/{variant}: no evaluation ({outcomes_path.relative_to(ROOT)} missing); skipped")
        return []
    outcomes = json.loads(outcomes_path.read_text())
    result = json.loads(metrics_path.read_text())[job]
    ctx = prepare_job(params, job, variant)
    model = ctx.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    index = {sid: i for i, sid in enumerate(ctx.data.sample_ids)}
    rows = []
    judged = gated(params, job)
    for norm in ("linf", "l2"):
        block = outcomes.get(f"ensemble_{norm}")
        if not block:
            continue
        curve = result["pgd"][norm]
        ens = curve["ensemble"]
        q = queries or ens.get("square_queries") or 1000
        ids = [index[s] for s in block["ids"]]
        x_all, y_all = ctx.data.x[ids], ctx.data.y[ids]
        pgd_survived = dict(zip(curve["eps"], curve["survived"], strict=True))
        for j, e in enumerate(ensemble_eps(curve)):  # the ε where the ensemble ran
            if e == 0 or (only_gated and (norm, float(e)) not in judged):
                continue
            broken = torch.tensor(block["broken"][f"{e:g}"])
            keep = (~broken).nonzero().flatten()
            row = {"job": job, "variant": variant, "norm": norm, "eps": e, "n": len(ids),
                   "pgd_survived": pgd_survived[e], "ensemble_survived": ens["survived"][j],
                   "attacked": int(keep.numel()), "queries": q, "ensemble_seconds": ens["seconds"]}
            if keep.numel():
                got = torchattacks_broken(ta, model, x_all[keep], y_all[keep], e, norm, steps, q, seed)
                either = got["apgd-ce"]["broken"] | got["square"]["broken"]
                row.update({
                    "ta_apgd": int(got["apgd-ce"]["broken"].sum()), "ta_square": int(got["square"]["broken"].sum()),
                    "ta_extra": int(either.sum()), "ta_invalid": got["apgd-ce"]["invalid"] + got["square"]["invalid"],
                    "ta_seconds": got["apgd-ce"]["seconds"] + got["square"]["seconds"],
                })
            else:
                row.update({"ta_apgd": 0, "ta_square": 0, "ta_extra": 0, "ta_invalid": 0, "ta_seconds": 0.0})
            rows.append(row)
            print(_line(row), flush=True)
    return rows


HEADER = ("| job | variant | norm | ε | N | PGD alone survived | ensemble survived | torchattacks APGD-CE / "
          "Square / either broke of those | ensemble s (all ε) | torchattacks s | within one sample |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def _line(r: dict[str, Any]) -> str:
    ok = "yes" if r["ta_extra"] <= 1 else "**NO**"
    return (f"| {r['job']} | {r['variant']} | {r['norm']} | {r['eps']:g} | {r['n']} | {r['pgd_survived']} | "
            f"{r['ensemble_survived']} | {r['ta_apgd']} / {r['ta_square']} / {r['ta_extra']} of {r['attacked']} | "
            f"{r['ensemble_seconds']:.0f} | {r['ta_seconds']:.0f} | {ok} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", nargs="*", default=["nodule2d", "nodule3d", "covid2d"])
    ap.add_argument("--variants", nargs="*", default=["baseline", "hardened"])
    ap.add_argument("--steps", type=int, default=100, help="torchattacks APGD iterations")
    ap.add_argument("--queries", type=int, default=None, help="torchattacks Square queries (default: the evaluation's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--all-eps", action="store_true", help="every ε the ensemble ran at, not only the gated ones")
    args = ap.parse_args()
    try:
        import torchattacks as ta
    except ImportError:
        sys.exit(f"torchattacks is not installed; for this benchmark only: {INSTALL_HINT}")
    params = load_params(ROOT / "params.yaml", args.profile)
    print(f"torchattacks {ta.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(HEADER)
    rows = [r for job in args.jobs for v in args.variants
            for r in crosscheck(params, job, v, ta, args.steps, args.queries, args.seed, not args.all_eps)]
    bad = [r for r in rows if r["ta_extra"] > 1]
    print(f"\n{len(rows)} job/norm/ε rows; torchattacks broke more than one sample ctharden reported as "
          f"surviving in {len(bad)} of them.")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

"""Attack throughput: ctharden's PGD vs torchattacks, the random NPS attack vs a per-sample NumPy
loop, and the achieved GFLOP/s of a PGD step vs a large matmul.

Everything runs in this one process, on the same models and inputs; only ratios measured here
are meant to be compared (a shared machine makes absolute times drift). Methods are interleaved
within a round; samples/s are the best round, "x torchattacks" is the ratio of best rounds
(robust to a burst of contention in one round) and "(median)" the median per-round ratio.

1. **100-PGD (L∞, CE loss, 1 random start)** on the nodule CNN (``nodule3d`` width 16, 32³
   cubes; the trained ``artifacts/models/nodule3d/model.pt`` on the synthetic phantoms of
   ``artifacts/datasets/synthetic_nodule3d`` when present, else a net trained here for a few
   seconds on fresh phantoms) and, without ``--quick``, the COVID ResNet-18 2D at 112×112
   (``artifacts/models/covid2d/model.pt`` fine-tuned here for a few epochs at 112×112 on the
   downsampled training images, else trained from scratch on phantoms). Only samples the model
   classifies correctly are attacked. Methods, all at the same ε, α = 2.5·ε/100, 100 steps,
   uniform random start:

   a. ``torchattacks.PGD`` fp32 (the reference; it needs class logits, so the binary-logit nodule
      CNN is wrapped to return ``[-z/2, z/2]``: softmax CE on these is BCE on ``z``);
   b. ``ctharden.attacks.pgd`` fp32, ``loss="ce"``, ``early_stop=False`` (the same algorithm; it
      gets the *plain* model, whose CE loss is BCE on ``z`` — equivalent);
   c. the same with ``autocast=True`` (bf16 forward/backward, fp32 decision);
   d. (c) + ``early_stop=True`` (the evaluation's configuration).

   Success rate = share of samples whose fp32 eval-mode prediction on the returned input is wrong
   (computed here for torchattacks; ``broken`` for ours). torchattacks returns the last iterate,
   ours the worst iterate of the run, so (b) can break a sample that (a) reaches and then leaves. ε comes
   from a short 10-step sweep so that success is partial; a second, larger ε breaks most samples (where
   early stop shines).
   **Goal: (d) ≥ 3× torchattacks' samples/s at the same or higher success.**
   torchattacks is installed only for this benchmark: ``pip install --no-deps torchattacks``; the
   section is skipped (with that hint) when it is missing.

2. **Random NPS attack** (``random_nps_attack``: K noise draws per sample and mAs level, batched
   in torch) vs a plain Python loop over samples × mAs × K that draws the same NPS noise model with
   ``np.fft`` (white Gaussian noise filtered per axial slice by sqrt(NPS/(Δx·Δy)) on the rfft2
   grid, as ``ctharden.noise.sample_nps_noise`` does), adds it in HU and runs the fp32 model on one
   sample at a time. Throughput = perturbed forward passes per second (N·K·levels); the loop runs
   over every sample once, in chunks interleaved with repeats of the batched attack, and each side's
   best round counts. The samples are those with the smallest clean |logit| (so some flips happen).
   Both SAN rates (and mean SARs) are printed with the paired sampling error of their difference.
   **Goal: ≥ 5× the loop's passes/s.**

3. **Achieved GFLOP/s** of one PGD step (forward + backward w.r.t. the input only, parameters
   frozen) in fp32 and under bf16 autocast; FLOPs counted by
   ``torch.utils.flop_counter.FlopCounterMode`` on that very call (the backward of a frozen
   network has only input-gradient convolutions, so it costs about one forward). Compared with a
   large square matmul (fp32 and bf16) on the same machine.

    python benchmarks/attacks.py            # ~4 min on 2 idle cores (48 cubes, 8 ResNet images)
    python benchmarks/attacks.py --quick    # ~35 s: nodule CNN only (16 cubes), fewer draws

On a machine shared with other jobs, torch's default (spinning) OpenMP threads slow down 10-20x
whenever another process holds a core; ``OMP_WAIT_POLICY=PASSIVE python benchmarks/attacks.py``
keeps that to ~2x (and costs ~15% on an idle machine). The script prints how much CPU other
processes used just before and during the run (from /proc/stat).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ctharden.attacks import pgd, random_nps_attack
from ctharden.models import CTClassifier, build_model, predicted_label
from ctharden.noise import default_nps, grid_nps

ROOT = Path(__file__).resolve().parents[1]
NODULE_MODEL = ROOT / "artifacts" / "models" / "nodule3d" / "model.pt"
NODULE_DATA = ROOT / "artifacts" / "datasets" / "synthetic_nodule3d"
COVID_MODEL = ROOT / "artifacts" / "models" / "covid2d" / "model.pt"
COVID_DATA = ROOT / "artifacts" / "datasets" / "covid"
STEPS = 100
INSTALL_HINT = "pip install --no-deps torchattacks"


# ---------------------------------------------------------------------------------------------------
# models and data


@dataclass
class Case:
    """A model and the samples to attack (model-input units, all correctly classified)."""

    name: str
    model: CTClassifier
    x: torch.Tensor  # (N, ...) in [0, 1]
    y: torch.Tensor  # (N,) long
    source: str
    eps_unit: str  # how to print ε
    eps_scale: float  # ε in eps_unit = ε (model units) * eps_scale
    x_hu: torch.Tensor | None = None  # raw HU (nodule only)
    extra: dict = field(default_factory=dict)


class TwoLogits(nn.Module):
    """Binary logit z -> class logits [-z/2, z/2] (softmax CE on these = BCE on z)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return torch.stack([-z / 2, z / 2], 1)


def _labels(model: CTClassifier, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([predicted_label(model(x[i : i + batch]), model.output) for i in range(0, len(x), batch)])


def _train(model: CTClassifier, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int = 32) -> None:
    """A few Adam epochs under bf16 autocast (BCE for a logit, CE for two logits)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x[idx])
            out = out.float()
            if model.output == "logit":
                loss = F.binary_cross_entropy_with_logits(out, y[idx].float())
            else:
                loss = F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def nodule_case(n: int) -> Case:
    from ctharden.data.synthetic import nodule_phantom

    source = None
    if NODULE_MODEL.is_file() and (NODULE_DATA / "manifest.csv").is_file():
        try:
            from ctharden.data.dataset import load_arrays, read_manifest
            from ctharden.models.files import load_model

            model, _ = load_model(NODULE_MODEL)
            df = read_manifest(NODULE_DATA)
            df = df.sort_values("split", key=lambda s: s != "test", kind="stable")  # test split first
            x_hu = torch.from_numpy(load_arrays(NODULE_DATA, df["array"].tolist()))
            y = torch.from_numpy(df["label"].to_numpy(dtype=np.int64, copy=True))
            source = (f"trained {NODULE_MODEL.relative_to(ROOT)} ({model.config()['arch_kwargs']}), "
                      f"cubes of {NODULE_DATA.relative_to(ROOT)}")
        except Exception as exc:  # a benchmark: fall back rather than fail
            print(f"  (could not load the trained nodule model/data: {type(exc).__name__}: {exc}; training one)")
            source = None
    if source is None:
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        labels = np.arange(256) % 2
        x_hu = torch.from_numpy(np.stack([nodule_phantom(rng, bool(lab))[0] for lab in labels]))
        y = torch.as_tensor(labels, dtype=torch.long)
        torch.manual_seed(0)
        model = build_model("nodule3d", spatial_dims=3, window_hu=(-1000.0, 400.0), width=16)
        _train(model, model.to_input(x_hu), y, epochs=8, lr=1e-3)
        source = f"nodule3d width 16 trained here for {time.perf_counter() - t0:.0f} s on 256 fresh phantoms"
    model.eval()
    x = model.to_input(x_hu)
    pred = _labels(model, x)
    ok = (pred == y).nonzero().squeeze(1)
    acc = len(ok) / len(y)
    sel = ok[:n]
    return Case("nodule3d (width 16), 32³ cubes", model, x[sel].contiguous(), y[sel], f"{source}; clean accuracy "
                f"{acc:.1%} on {len(y)} cubes", "HU", 1400.0, x_hu=x_hu,
                extra={"all_x_hu": x_hu, "all_y": y})


def covid_case(n: int, size: int = 112) -> Case:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    source = None
    if COVID_MODEL.is_file() and (COVID_DATA / "manifest.csv").is_file():
        try:
            from ctharden.data.dataset import load_arrays, read_manifest
            from ctharden.models.files import load_model

            model, _ = load_model(COVID_MODEL)
            df = read_manifest(COVID_DATA)
            imgs = torch.from_numpy(load_arrays(COVID_DATA, df["array"].tolist()))[:, None]
            x_all = F.interpolate(imgs, size=(size, size), mode="area").clamp(0, 1)
            y_all = torch.from_numpy(df["label"].to_numpy(dtype=np.int64, copy=True))
            train = torch.from_numpy((df["split"] == "train").to_numpy(dtype=bool, copy=True))
            _train(model, x_all[train], y_all[train], epochs=3, lr=1e-4)
            x, y = x_all[~train], y_all[~train]
            source = (f"{COVID_MODEL.relative_to(ROOT)} (trained at 224²) fine-tuned here 3 epochs at {size}² "
                      f"on the downsampled training images ({time.perf_counter() - t0:.0f} s); test images")
        except Exception as exc:
            print(f"  (could not use the trained covid model/data: {type(exc).__name__}: {exc}; training one)")
            source = None
    if source is None:
        from ctharden.data.synthetic import covid_phantom

        rng = np.random.default_rng(0)
        labels = np.arange(160) % 2
        x_all = torch.from_numpy(np.stack([covid_phantom(rng, bool(lab), size)[0] for lab in labels]))[:, None]
        y_all = torch.as_tensor(labels, dtype=torch.long)
        model = build_model("resnet18_2d", spatial_dims=2, window_hu=None)
        _train(model, x_all[:128], y_all[:128], epochs=10, lr=1e-3)
        x, y = x_all[128:], y_all[128:]
        source = f"resnet18_2d trained here on {size}² phantoms ({time.perf_counter() - t0:.0f} s)"
    model.eval()
    pred = _labels(model, x)
    ok = (pred == y).nonzero().squeeze(1)
    sel = ok[:n]
    return Case(f"resnet18_2d, {size}×{size} images", model, x[sel].contiguous(), y[sel],
                f"{source}; clean accuracy {len(ok) / len(y):.1%} on {len(y)} held-out images", "/255", 255.0)


# ---------------------------------------------------------------------------------------------------
# 1. PGD


def torchattacks_pgd(ta, model: nn.Module, eps: float, alpha: float, steps: int = STEPS) -> Callable:
    attack = ta.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = attack(x, y)
        with torch.no_grad():
            model.eval()
            return model(x_adv).argmax(1) != y  # fp32 eval-mode decision on its output

    return run


def ours_pgd(model: nn.Module, eps: float, alpha: float, autocast: bool, early_stop: bool,
             steps: int = STEPS) -> Callable:
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, broken = pgd(model, x, y, eps, norm="linf", steps=steps, step_size=alpha, restarts=1, loss="ce",
                        autocast=autocast, early_stop=early_stop)
        return broken

    return run


def sweep_eps(case: Case, candidates: list[float], n: int) -> tuple[float, float, list[tuple[float, float]]]:
    """Success of a 10-step bf16 early-stop PGD at each candidate; (partial ε, large ε, table)."""
    x, y = case.x[:n], case.y[:n]
    table = []
    for e in candidates:
        torch.manual_seed(0)
        _, b = pgd(case.model, x, y, e, steps=10, autocast=True, early_stop=True)
        table.append((e, float(b.float().mean())))
    # 10 steps under-estimate 100-step success: aim a little below one half
    partial = min(table, key=lambda t: (abs(t[1] - 0.35), t[0]))[0]
    big = [e for e, s in table if e >= 2 * partial and s >= 0.95]
    large = big[0] if big else candidates[-1]
    return partial, large, table


def pgd_section(case: Case, ta, rounds: int, sweep_n: int) -> dict:
    model = case.model
    fmt = lambda e: f"{e * case.eps_scale:.3g} {case.eps_unit}"  # noqa: E731
    candidates = [c / 255 for c in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16)]
    t0 = time.perf_counter()
    partial, large, table = sweep_eps(case, candidates, sweep_n)
    print(f"  ε sweep (10-step PGD, bf16 + early stop, {min(sweep_n, len(case.y))} samples, "
          f"{time.perf_counter() - t0:.0f} s): " + ", ".join(f"{fmt(e)}: {s:.0%}" for e, s in table))
    binary = model.output == "logit"
    ta_model = TwoLogits(model).eval() if binary else model
    ours_note = ("ours gets the plain binary-logit model with loss='ce' (BCE on z); torchattacks gets "
                 "[-z/2, z/2] (softmax CE = the same BCE)") if binary else "both get the same two-logit model"
    print(f"  {ours_note}")
    x, y = case.x, case.y
    out = {}
    for label, eps in (("partial", partial), ("large", large)):
        alpha = 2.5 * eps / STEPS

        def make(steps: int, eps: float = eps, alpha: float = alpha) -> dict[str, Callable]:
            return {
                "(a) torchattacks PGD fp32": torchattacks_pgd(ta, ta_model, eps, alpha, steps),
                "(b) ours fp32": ours_pgd(model, eps, alpha, False, False, steps),
                "(c) ours bf16 autocast": ours_pgd(model, eps, alpha, True, False, steps),
                "(d) ours bf16 + early stop": ours_pgd(model, eps, alpha, True, True, steps),
            }

        # warm-up: 3 steps of each on the full batch (oneDNN primitives for these shapes, allocator)
        for run in make(3).values():
            torch.manual_seed(1)
            run(x, y)
        methods = make(STEPS)
        times: dict[str, list[float]] = {k: [] for k in methods}
        success: dict[str, float] = {}
        for _ in range(rounds):
            for name, run in methods.items():
                torch.manual_seed(0)
                t = time.perf_counter()
                broken = run(x, y)
                times[name].append(time.perf_counter() - t)
                success[name] = float(broken.float().mean())
        ref = times["(a) torchattacks PGD fp32"]
        print(f"\n  ε = {fmt(eps)} ({label}; {eps:.5f} model units), α = 2.5·ε/{STEPS}, {STEPS} steps, "
              f"1 random start, {len(y)} samples, {rounds} rounds")
        print(f"    {'method':<28} {'samples/s':>10} {'x torchattacks':>15} {'(median)':>9} {'success':>8}")
        rows = {}
        for name in methods:
            ratio = min(ref) / min(times[name])
            median = statistics.median(r / t for r, t in zip(ref, times[name], strict=True))
            sps = len(y) / min(times[name])
            rows[name] = {"sps": sps, "ratio": ratio, "median": median, "success": success[name],
                          "time": min(times[name])}
            print(f"    {name:<28} {sps:>10.2f} {ratio:>14.2f}x {median:>8.2f}x {success[name]:>8.1%}")
        out[label] = {"eps": eps, "rows": rows}
    return out


# ---------------------------------------------------------------------------------------------------
# 2. random NPS attack


def numpy_nps_baseline(model: CTClassifier, x_hu: np.ndarray, levels: list[float], k: int, spacing: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Per sample, per mAs, per draw: NumPy NPS noise, one fp32 forward of a batch of 1.

    Returns the flip counts ``(levels, N)``."""
    nps = default_nps()
    hw = x_hu.shape[-2:]
    s = grid_nps(hw, spacing, None, nps=nps, half=True).numpy()  # NPS_ref on the rfft2 grid
    filt = np.sqrt(np.clip(s, 0, None) / (spacing * spacing))
    counts = np.zeros((len(levels), len(x_hu)), dtype=int)
    model.eval()
    with torch.no_grad():
        for i, cube in enumerate(x_hu):
            clean = predicted_label(model(model.to_input(torch.from_numpy(cube)[None])), model.output).item()
            for m, mas in enumerate(levels):
                scale = math.sqrt(nps.ref_mas / mas)
                for _ in range(k):
                    white = rng.standard_normal(cube.shape)
                    noise = np.fft.irfft2(np.fft.rfft2(white) * filt, s=hw) * scale  # per axial slice
                    xin = model.to_input(torch.from_numpy((cube + noise).astype(np.float32))[None])
                    counts[m, i] += int(predicted_label(model(xin), model.output).item() != clean)
    return counts


def nps_section(case: Case, n: int, k: int, levels: list[float], repeats: int) -> dict:
    model = case.model
    x_all, spacing = case.extra["all_x_hu"], 1.0
    with torch.no_grad():
        z = torch.cat([model(model.to_input(x_all[i : i + 64])) for i in range(0, len(x_all), 64)])
    sel = z.abs().argsort()[:n]
    x_hu = x_all[sel].contiguous()
    passes = n * k * len(levels)
    print(f"  {n} cubes (smallest clean |logit| of {len(x_all)}), mAs {levels}, K = {k}, spacing {spacing} mm: "
          f"{passes} perturbed forward passes per attack")
    # Interleaved: each round runs our whole attack, then one chunk of the samples through the loop
    # (the loop covers every sample once, for the SAN comparison). passes/s: the best round of each.
    xn = x_hu.numpy()
    random_nps_attack(model, x_hu[:4], levels, 2, spacing, generator=torch.Generator().manual_seed(1))  # warm-up
    numpy_nps_baseline(model, xn[:1], levels[:1], 2, spacing, np.random.default_rng(1))  # warm-up
    rng = np.random.default_rng(0)
    chunks = np.array_split(np.arange(n), repeats)
    pps_ours_r, pps_base_r, counts_parts, t_base_total = [], [], [], 0.0
    for chunk in chunks:
        t = time.perf_counter()
        res = random_nps_attack(model, x_hu, levels, k, spacing, generator=torch.Generator().manual_seed(0))
        pps_ours_r.append(passes / (time.perf_counter() - t))
        t = time.perf_counter()
        counts_parts.append(numpy_nps_baseline(model, xn[chunk], levels, k, spacing, rng))
        dt = time.perf_counter() - t
        t_base_total += dt
        pps_base_r.append(len(chunk) * k * len(levels) / dt)
    counts = np.concatenate(counts_parts, axis=1)
    pps_ours, pps_base = max(pps_ours_r), max(pps_base_r)
    ratio = pps_ours / pps_base
    print(f"    {'method':<44} {'passes/s':>10} {'ratio':>7}")
    print(f"    {'per-sample NumPy noise + fp32 batch-of-1 loop':<44} {pps_base:>10.0f} {1:>6.2f}x   "
          f"(best of {repeats} chunks of ~{passes // repeats} passes; the whole loop took {t_base_total:.1f} s)")
    print(f"    {'ctharden random_nps_attack (batched, fp32)':<44} {pps_ours:>10.0f} {ratio:>6.2f}x   "
          f"(best of {repeats} runs of {passes} passes, interleaved with the loop's chunks)")
    print(f"    {'mAs':>6} {'SAN/N ours':>11} {'SAN/N loop':>11} {'±2 SE':>7} {'mean SAR ours':>14} "
          f"{'loop':>7} {'±2 SE':>7}  agree")
    agree_all = True
    for m, mas in enumerate(levels):
        lv = res[mas]
        sar_b = counts[m] / k
        any_b = sar_b > 0
        d_san = lv.flipped_any.astype(float) - any_b.astype(float)
        d_sar = lv.sar - sar_b
        se_san = 2 * (d_san.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0)
        se_sar = 2 * (d_sar.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0)
        ok = abs(d_san.mean()) <= max(se_san, 1.0 / n) and abs(d_sar.mean()) <= max(se_sar, 1.0 / (n * k))
        agree_all &= ok
        print(f"    {mas:>6g} {lv.san_rate:>10.1f}% {any_b.mean() * 100:>10.1f}% {se_san * 100:>6.1f}% "
              f"{lv.sar.mean():>14.4f} {sar_b.mean():>7.4f} {se_sar:>7.4f}  {'yes' if ok else 'NO'}")
    print("    (±2 SE: twice the paired standard error of the per-sample difference ours − loop; the two use "
          "independent noise draws)")
    return {"pps_ours": pps_ours, "pps_base": pps_base, "ratio": ratio, "agree": agree_all}


# ---------------------------------------------------------------------------------------------------
# 3. GFLOP/s


def pgd_step_flops(model: nn.Module, x: torch.Tensor, bf16: bool) -> tuple[float, Callable[[], None]]:
    """FLOPs of one fwd + bwd w.r.t. the input (parameters frozen), and a closure running it."""

    def step() -> torch.Tensor:
        xg = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(xg)
        # .backward() rather than autograd.grad: FlopCounterMode's module hooks reject
        # autograd.grad on a leaf; with frozen parameters only xg.grad is computed either way
        out.float().sum().backward()
        return xg.grad

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops()), step


def flops_section(cases: list[tuple[str, nn.Module, torch.Tensor]], matmul_n: int, rounds: int,
                  attack_rows: dict[str, dict]) -> dict:
    """GFLOP/s of PGD steps and of matmuls, timed in interleaved rounds (best round of each)."""
    a = torch.randn(matmul_n, matmul_n)
    b = torch.randn(matmul_n, matmul_n)
    jobs: dict[str, tuple[float, Callable[[], object]]] = {}
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        aa, bb = a.to(dtype), b.to(dtype)
        jobs[f"matmul {prec}"] = (2.0 * matmul_n**3, lambda aa=aa, bb=bb: torch.mm(aa, bb))
    frozen = [(p, p.requires_grad) for _, model, _ in cases for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        for name, model, x in cases:
            model.eval()
            for prec, bf16 in (("fp32", False), ("bf16", True)):
                jobs[f"{name} {prec}"] = pgd_step_flops(model, x, bf16)
        best = {k: float("inf") for k in jobs}
        for _, fn in jobs.values():  # warm-up
            fn()
        for _ in range(rounds):
            for k, (_, fn) in jobs.items():
                t = time.perf_counter()
                for _ in range(3):
                    fn()
                best[k] = min(best[k], (time.perf_counter() - t) / 3)
    finally:
        for p, rg in frozen:
            p.requires_grad_(rg)
    gf = {k: jobs[k][0] / best[k] / 1e9 for k in jobs}
    label = f"matmul {matmul_n}³"
    print(f"    {label:<36} fp32 {gf['matmul fp32']:>7.1f} GFLOP/s   bf16 {gf['matmul bf16']:>7.1f} GFLOP/s   "
          f"(best of {rounds} interleaved rounds, as every row)")
    out: dict = {"matmul": {"fp32": gf["matmul fp32"], "bf16": gf["matmul bf16"]}}
    for name, _, x in cases:
        for prec in ("fp32", "bf16"):
            k = f"{name} {prec}"
            flops, g = jobs[k][0], gf[k]
            pct = 100 * g / gf[f"matmul {prec}"]
            out[k] = {"gflops": g, "pct": pct}
            print(f"    {name + ' PGD step ' + prec:<36} {flops / len(x) / 1e6:>7.1f} MFLOP/sample  "
                  f"{best[k] * 1e3:>7.1f} ms/batch of {len(x)}  {g:>7.1f} GFLOP/s = {pct:>5.1f}% of {prec} matmul")
            if name in attack_rows and prec in attack_rows[name]:
                row = attack_rows[name][prec]
                whole = flops / len(x) * STEPS * row["sps"] / 1e9
                print(f"    {'  whole 100-PGD ' + row['label']:<36} {'':>21} {'':>22}  {whole:>7.1f} GFLOP/s "
                      f"= {100 * whole / g:>5.1f}% of the bare step")
    return out


# ---------------------------------------------------------------------------------------------------


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole machine, of this process) so far; None without /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(fields[:8]) - idle) / hz, own.user + own.system


def others_busy(since: tuple[float, float] | None, wall: float) -> float | None:
    """Cores' worth of CPU that *other* processes used on average since the snapshot ``since``."""
    now = _cpu_seconds()
    if since is None or now is None or wall <= 0:
        return None
    return max(0.0, (now[0] - since[0]) - (now[1] - since[1])) / wall


CONTENTION_HINT = (
    "timings are unreliable: with every core busy, torch's spinning OpenMP threads wait on each other "
    "and times swing by up to 10-20x; re-run on an idle machine (or with OMP_WAIT_POLICY=PASSIVE in the "
    "environment, or --threads 1)"
)


def contention_note(others: float | None, when: str) -> str:
    if others is None:
        return f"CPU use of other processes {when}: unknown"
    note = f"other processes used {others:.2f} of {os.cpu_count()} cores {when}"
    if others > 0.25:
        note += f" -- {CONTENTION_HINT}"
    if os.environ.get("OMP_WAIT_POLICY"):
        note += f" [OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}]"
    return note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="nodule CNN only, fewer samples, draws and rounds")
    parser.add_argument("--n", type=int, default=None, help="nodule samples to attack (default 48; quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per method (default 3; quick 2)")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18 2D")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    quick = args.quick
    n_nodule = args.n or (16 if quick else 48)
    rounds = max(2, args.rounds or (2 if quick else 3))
    resnet = not (quick or args.no_resnet)
    snap = _cpu_seconds()
    time.sleep(1.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
          f"{', quick' if quick else ''}; {contention_note(others_busy(snap, 1.0), 'in the last second')}")
    t_start = time.perf_counter()
    snap = _cpu_seconds()

    print("\nsetting up models ...")
    nodule = nodule_case(n_nodule)
    print(f"  nodule3d: {nodule.source}; attacking {len(nodule.y)} correctly classified cubes")
    cases = [nodule]
    if resnet:
        covid = covid_case(8)
        print(f"  resnet18_2d: {covid.source}; attacking {len(covid.y)} correctly classified images")
        cases.append(covid)

    summary: list[str] = []
    attack_rows: dict[str, dict] = {}
    # 1 ------------------------------------------------------------------------------------------
    print("\n[1] 100-PGD (L∞, CE) throughput vs torchattacks.PGD at equal settings")
    try:
        import torchattacks as ta
    except ImportError:
        ta = None
        print(f"  torchattacks is not installed: skipped. It is installed only for this benchmark: {INSTALL_HINT}")
    if ta is not None:
        print(f"  torchattacks {ta.__version__}")
        for case in cases:
            print(f"\n  {case.name}")
            # the ResNet is ~10x the FLOPs per sample: 2 rounds keep the default run within minutes
            case_rounds = rounds if case is nodule else min(rounds, 2)
            res = pgd_section(case, ta, case_rounds, sweep_n=32 if quick else 48)
            short = case.name.split(" ")[0].rstrip(",")
            for label, r in res.items():
                d = r["rows"]["(d) ours bf16 + early stop"]
                a = r["rows"]["(a) torchattacks PGD fp32"]
                b = r["rows"]["(b) ours fp32"]
                summary.append(f"PGD {short}, {label} ε: (d) {d['ratio']:.2f}x torchattacks "
                               f"(goal ≥ 3x; success {d['success']:.0%} vs {a['success']:.0%}); "
                               f"(b) equal algorithm {b['ratio']:.2f}x")
            rows = res["partial"]["rows"]
            attack_rows[short] = {
                "fp32": {**rows["(b) ours fp32"], "label": "(b) fp32, partial ε"},
                "bf16": {**rows["(c) ours bf16 autocast"], "label": "(c) bf16, partial ε"},
            }

    # 2 ------------------------------------------------------------------------------------------
    print("\n[2] random NPS attack: perturbed forward passes/s vs a per-sample NumPy noise + fp32 loop")
    if quick:
        nps = nps_section(nodule, n=16, k=8, levels=[10.0, 25.0, 50.0], repeats=2)
    else:
        nps = nps_section(nodule, n=32, k=20, levels=[10.0, 25.0, 50.0, 100.0], repeats=3)
    summary.append(f"random NPS attack: {nps['ratio']:.1f}x the per-sample loop (goal ≥ 5x); SAN rates "
                   f"{'agree' if nps['agree'] else 'DO NOT agree'} within 2 SE")

    # 3 ------------------------------------------------------------------------------------------
    print("\n[3] achieved GFLOP/s: PGD step (fwd + bwd w.r.t. the input, frozen parameters) vs a square matmul")
    fl_cases = [("nodule3d", nodule.model, nodule.x[:32] if quick else nodule.x[:48])]
    if resnet:
        fl_cases.append(("resnet18_2d", cases[1].model, cases[1].x[:8]))
    fl = flops_section(fl_cases, 1024 if quick else 2048, 3, attack_rows)
    summary.append("PGD step: nodule3d fp32 {:.0f}% of fp32 matmul, bf16 {:.0f}% of bf16 matmul".format(
        fl["nodule3d fp32"]["pct"], fl["nodule3d bf16"]["pct"]))

    wall = time.perf_counter() - t_start
    print(f"\ntotal {wall:.0f} s; {contention_note(others_busy(snap, wall), 'on average during the run')}")
    print("summary:")
    for line in summary:
        print(f"  - {line}")


if __name__ == "__main__":
    main()

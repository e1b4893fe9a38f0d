"""Training throughput of the nodule CNN and ResNet-18 under the CPU (or GPU) speed settings.

One training step = forward + backward + Adam step on a fixed batch (32 cubes of 32³ for the
nodule CNN ``nodule3d`` at several widths; 16 images of 224×224 for ``resnet18_2d``). Every
setting of one model is measured in this one process: each gets a copy of the same initial
weights, a few warm-up steps (torch.compile's compilation happens there and is reported
separately), then the settings are timed in interleaved rounds. The ratio against the fp32
baseline is the median over rounds of the per-round ratio, so slow drifts of a shared machine
cancel; samples/s are the best round.

Settings (CPU): fp32, channels_last(_3d), bf16 autocast, bf16 + channels_last, torch.compile.
With ``--device cuda``: fp32, channels_last, fp16 AMP (GradScaler), bf16 AMP, bf16 +
channels_last, torch.compile. Weights and optimizer state stay fp32 in every setting.

A further table compares the nodule CNN's strided first conv (``stem_stride=2``, the default)
with a full-resolution first conv followed by a max-pool (``stem_stride=1``). A last section
checks that bf16 autocast training still learns (a separable toy task, fp32 and
bf16 from the same initial weights).

    python benchmarks/train_throughput.py [--quick] [--device cpu|cuda] [--widths 16 32 64]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctharden.models import CTClassifier, build_model, predicted_label


@dataclass(frozen=True)
class Setting:
    name: str
    channels_last: bool = False
    amp: torch.dtype | None = None
    compile: bool = False


CPU_SETTINGS = [
    Setting("fp32"),
    Setting("channels_last", channels_last=True),
    Setting("bf16", amp=torch.bfloat16),
    Setting("bf16+channels_last", channels_last=True, amp=torch.bfloat16),
    Setting("compile", compile=True),
]
CUDA_SETTINGS = [
    Setting("fp32"),
    Setting("channels_last", channels_last=True),
    Setting("fp16 amp", amp=torch.float16),
    Setting("bf16 amp", amp=torch.bfloat16),
    Setting("bf16+channels_last", channels_last=True, amp=torch.bfloat16),
    Setting("compile", compile=True),
]


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise :class:`CompileTimeout` in the main thread after ``seconds`` (Unix only)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):  # noqa: ARG001
        raise CompileTimeout(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_step(model: CTClassifier, setting: Setting, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """A closure running one training step of ``model`` (modified in place) under ``setting``."""
    device = x.device
    if setting.channels_last:
        model.to_channels_last()
    fwd: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if setting.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if setting.amp == torch.float16 else None
    target = y.float() if model.output == "logit" else y

    def step() -> float:
        with torch.autocast(device.type, dtype=setting.amp, enabled=setting.amp is not None):
            out = fwd(x)
        out = out.float()
        loss = (
            F.binary_cross_entropy_with_logits(out, target) if model.output == "logit" else F.cross_entropy(out, target)
        )
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss.item()  # also synchronises CUDA

    return step


def measure(
    cases: dict[str, tuple[Callable[[], CTClassifier], Setting]],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    warmup: int,
    rounds: int,
    steps: int,
    compile_timeout: int,
    baseline: str = "fp32",
) -> dict[str, dict]:
    """Warm up every case (a model and a setting), then time them in interleaved rounds.

    Returns per-case results; ``ratio`` is the median per-round speed-up against ``baseline``.
    """
    results: dict[str, dict] = {}
    steppers: dict[str, Callable[[], float]] = {}
    for name, (make_model, s) in cases.items():
        model = make_model().to(x.device).train()
        try:
            step = make_step(model, s, x, y)
            t0 = time.perf_counter()
            with time_limit(compile_timeout if s.compile else 0):
                for _ in range(warmup):
                    loss = step()
            if not torch.isfinite(torch.tensor(loss)):
                raise RuntimeError(f"non-finite loss {loss}")
            results[name] = {"warmup_s": time.perf_counter() - t0, "times": [], "ratios": [], "compile": s.compile}
            steppers[name] = step
        except Exception as exc:  # report and go on: a benchmark, not a test
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            results[name] = {"error": f"{type(exc).__name__}: {msg[:100]}"}
    for _ in range(rounds):
        for name, step in steppers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            results[name]["times"].append((time.perf_counter() - t0) / steps)
    if baseline in steppers:
        ref = results[baseline]["times"]
        for name in steppers:
            results[name]["ratios"] = [r / t for r, t in zip(ref, results[name]["times"], strict=True)]
    batch = x.shape[0]
    for res in results.values():
        if res.get("times"):
            res["best"] = batch / min(res["times"])
            res["median"] = batch / statistics.median(res["times"])
            res["ratio"] = statistics.median(res["ratios"]) if res["ratios"] else float("nan")
    return results


def print_table(title: str, results: dict[str, dict], baseline: str = "fp32") -> None:
    print(f"\n{title}")
    head = f"x {baseline}"
    width = max(20, *(len(k) for k in results))
    hw = max(9, len(head))
    print(f"  {'setting':<{width}} {'samples/s best':>15} {'median':>8} {head:>{hw}}  note")
    for name, res in results.items():
        if "error" in res:
            print(f"  {name:<{width}} {'-':>15} {'-':>8} {'-':>{hw}}  FAILED {res['error']}")
            continue
        note = f"warm-up {res['warmup_s']:.1f} s" + (" (incl. compilation)" if res["compile"] else "")
        print(f"  {name:<{width}} {res['best']:>15.1f} {res['median']:>8.1f} {res['ratio']:>{hw - 1}.2f}x  {note}")


def fastest(results: dict[str, dict]) -> str:
    ok = {k: v for k, v in results.items() if "ratio" in v}
    name = max(ok, key=lambda k: ok[k]["ratio"])
    return f"{name} ({ok[name]['ratio']:.2f}x)"


def learning_check(device: torch.device, amp: torch.dtype | None, steps: int) -> None:
    """fp32 vs low-precision autocast from the same weights on a separable toy task."""
    print(f"\nLearning check (nodule3d width 16, 32 cubes of 32³, a bright blob marks the positives, "
          f"{steps} Adam steps)")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 32, 32, 32, generator=g) * 0.3
    y = torch.arange(32) % 2
    x[y == 1, 12:20, 12:20, 12:20] += 0.4
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    base = build_model("nodule3d", width=16)
    for label, dtype in [("fp32", None), (str(amp).replace("torch.", ""), amp)]:
        model = copy.deepcopy(base).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(steps):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(x)
            loss = F.binary_cross_entropy_with_logits(out.float(), y.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            acc = (predicted_label(model.eval()(x), "logit") == y).float().mean().item()
        print(f"  {label:<5} loss {losses[0]:.3f} -> {losses[-1]:.3f} (min {min(losses):.3f}), "
              f"train accuracy {acc:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-resnet", action="store_true", help="skip resnet18_2d")
    parser.add_argument("--no-learning-check", action="store_true")
    parser.add_argument("--no-stem-compare", dest="stem_compare", action="store_false",
                        help="skip the stem_stride 1 vs 2 comparison (skipped with --quick too)")
    parser.add_argument("--compile-timeout", type=int, default=240, help="seconds allowed for compilation")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    torch.set_num_threads(os.cpu_count() or 1)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    settings = CUDA_SETTINGS if cuda else CPU_SETTINGS
    if args.no_compile:
        settings = [s for s in settings if not s.compile]
    warmup, rounds, steps = (1, 3, 1) if args.quick else (3, 7, 3)
    if cuda:
        warmup, rounds, steps = warmup + 3, rounds, steps * 10

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else f", {torch.get_num_threads()} threads")
          + f", warm-up {warmup} steps, {rounds} rounds of {steps} step(s) per setting")
    t_start = time.perf_counter()
    summary: list[str] = []
    torch.manual_seed(0)
    x = torch.rand(args.batch, 32, 32, 32, device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)
    for width in args.widths:
        def make(width: int = width, stem_stride: int = 2) -> CTClassifier:
            torch.manual_seed(0)
            return build_model("nodule3d", width=width, stem_stride=stem_stride)

        n = sum(p.numel() for p in make().parameters())
        res = measure({s.name: (make, s) for s in settings}, x, y, warmup=warmup, rounds=rounds, steps=steps,
                      compile_timeout=args.compile_timeout)
        print_table(f"nodule3d width {width} ({n / 1e6:.2f} M params), batch {args.batch} of 32³", res)
        summary.append(f"width {width}: {fastest(res)}")

    if args.stem_compare and not args.quick:
        width = max(args.widths)
        low = next(s for s in settings if s.amp is not None and not s.channels_last)
        cases = {}
        for stem in (2, 1):
            for s in (settings[0], low):
                cases[f"stem_stride={stem} {s.name}"] = (lambda stem=stem: make(width, stem), s)
        res = measure(cases, x, y, warmup=warmup, rounds=rounds, steps=steps, compile_timeout=0,
                      baseline="stem_stride=2 fp32")
        print_table(f"nodule3d width {width}: strided first conv (default) vs full-resolution first conv + "
                    "max-pool", res, baseline="stem_stride=2 fp32")

    if not args.no_resnet:
        rsettings = [s for s in settings if s.name in ("fp32", "bf16", "bf16 amp", "fp16 amp", "channels_last")]
        rx = torch.rand(16, 224, 224, device=device)
        ry = torch.randint(0, 2, (16,), device=device)

        def make_resnet() -> CTClassifier:
            torch.manual_seed(0)
            return build_model("resnet18_2d")

        res = measure({s.name: (make_resnet, s) for s in rsettings}, rx, ry, warmup=warmup,
                      rounds=rounds, steps=steps if cuda else 1, compile_timeout=0)
        print_table("resnet18_2d (MONAI, instance norm), batch 16 of 224×224", res)
        summary.append(f"resnet18_2d: {fastest(res)}")

    if not args.no_learning_check:
        learning_check(device, torch.bfloat16, steps=15 if args.quick else 30)

    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    print(f"fastest {'GPU' if cuda else 'CPU'} setting per model: " + "; ".join(summary))


if __name__ == "__main__":
    main()

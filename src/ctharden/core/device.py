"""Device, precision and thread settings for training and inference.

- ``device="auto"``: CUDA when available, else CPU.
- ``precision="auto"``: on CUDA, autocast fp16/bf16 (bf16 when supported) with AMP; on CPU,
  bf16 autocast when the CPU supports bf16 matrix instructions (measured 1.3-1.8x faster for the
  nodule CNN at widths 16-64 and 1.95x for ResNet-18 2D on this machine's AVX-512 BF16 cores, see
  benchmarks/train_throughput.py), else fp32. (Conv3d weight gradients that oneDNN gets wrong in
  bf16 are guarded in :mod:`ctharden.models.bf16_guard`.)
  ``"fp32"`` and ``"bf16"`` force a choice. Weights and optimizer state stay fp32 in every case.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ctharden.core.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None = plain fp32

    @property
    def name(self) -> str:
        dt = "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).replace("torch.", "")
        return f"{self.device.type}/{dt}"

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Autocast context for forward passes (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def cpu_has_bf16() -> bool:
    """True if this CPU advertises native bf16 matrix support (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Resolve ``device`` (auto|cpu|cuda|cuda:N) and ``precision`` (auto|fp32|bf16|fp16)."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"device {device!r}: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
    if precision == "auto":
        if dev.type == "cuda":
            dtype: torch.dtype | None = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16 if cpu_has_bf16() else None
    elif precision == "fp32":
        dtype = None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        if dev.type != "cuda":
            raise ConfigError("precision fp16 needs CUDA (use bf16 or fp32 on CPU)")
        dtype = torch.float16
    else:
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return Runtime(dev, dtype)


def set_threads(threads: int | str = "auto") -> int:
    """Set torch's intra-op threads: ``auto`` = the CPUs this process may use. Returns the number."""
    n = len(os.sched_getaffinity(0)) if threads == "auto" else int(threads)
    if n < 1:
        raise ConfigError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

"""One training run (one fold): Adam, balanced sampling, augmentation, model selection, resume.

Every epoch ends with an atomic checkpoint (``last.pt``: weights, optimizer, epoch, best weights,
history, early-stopping counter, and a fingerprint of the configuration and data). A run started
again with the same fingerprint resumes after the last completed epoch; because all randomness is
reseeded per (seed, fold, epoch), the resumed run ends with exactly the weights of an
uninterrupted one. A checkpoint with another fingerprint is ignored (and replaced).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ctharden.core.device import Runtime
from ctharden.core.errors import ConfigError
from ctharden.core.seeding import epoch_seed
from ctharden.data.arrays import ArraySet
from ctharden.evaluation.clean import binary_metrics
from ctharden.models import CTClassifier
from ctharden.models.files import load_file, save_atomic
from ctharden.models.predict import predict_scores
from ctharden.training.data import AugmentedSet, balanced_sampler
from ctharden.training.losses import check_loss, training_loss

log = logging.getLogger(__name__)
SELECT_ON = ("val_auc", "val_loss", "last")


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of one training run (from ``params.yaml`` ``train``)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    loss: str = "mse"
    balanced_sampling: bool = True
    shift_vox: float = 5.0
    rotate_deg: float = 15.0
    select_on: str = "val_auc"
    early_stopping_patience: int = 0  # 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"train: epochs, batch_size must be >= 1 and lr > 0 (got {self})")
        if self.select_on not in SELECT_ON:
            raise ConfigError(f"train.select_on must be one of {SELECT_ON}, got {self.select_on!r}")


@dataclass
class FoldResult:
    """Outcome of :func:`train_fold`: the selected weights and the per-epoch history."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0


def fingerprint(cfg: TrainConfig, model: torch.nn.Module, data_hash: str, fold: int) -> str:
    """Hash of everything that determines a run's result; a checkpoint resumes only under the same one."""
    config = cast(CTClassifier, model).config()
    blob = json.dumps({"cfg": asdict(cfg), "model": config, "data": data_hash, "fold": fold}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _val_metrics(model: torch.nn.Module, val: ArraySet, cfg: TrainConfig, runtime: Runtime) -> dict[str, float]:

    outputs, scores = predict_scores(model, val.x, runtime, batch_size=max(cfg.batch_size, 64))
    with torch.no_grad():
        output = cast(CTClassifier, model).output
        loss = training_loss(torch.from_numpy(outputs), val.y, val.target, output, cfg.loss).item()
    m = binary_metrics(val.y.numpy(), scores)
    return {"val_loss": loss, "val_auc": m["auc"] if m["auc"] is not None else math.nan,
            "val_accuracy": m["accuracy"]}


def selection_score(cfg: TrainConfig, metrics: dict[str, float]) -> list[float]:
    """How good an epoch is under ``cfg.select_on``; scores compare lexicographically, higher is better.

    ``val_auc`` ties (AUC saturates at 1.0 on easy validation folds while the outputs are still
    uncalibrated) are broken by the lower validation loss.
    """
    if cfg.select_on == "last" or "val_loss" not in metrics:
        return [0.0]
    loss = metrics["val_loss"]
    if cfg.select_on == "val_auc":
        auc = metrics["val_auc"]
        return [-math.inf if math.isnan(auc) else auc, -loss]
    return [-loss]


def _improved(cfg: TrainConfig, metrics: dict[str, float], best: list[float] | None) -> tuple[bool, list[float]]:
    """Is this epoch better than ``best`` (always, under ``select_on='last'``)?"""
    score = selection_score(cfg, metrics)
    return best is None or cfg.select_on == "last" or score > best, score


def train_fold(
    model: torch.nn.Module,
    train: ArraySet,
    val: ArraySet | None,
    cfg: TrainConfig,
    runtime: Runtime,
    ckpt_path: Path,
    *,
    fold: int = 0,
    data_hash: str = "",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> FoldResult:
    """Train ``model`` in place on ``train``, select on ``val``; resume from ``ckpt_path`` if it matches.

    Without a validation set (or ``select_on='last'``) the last epoch is selected.
    ``on_epoch(epoch, metrics)`` is called after each completed epoch (e.g. MLflow logging).
    """
    clf = cast(CTClassifier, model)  # typed view of ``model``: output, spatial_dims
    check_loss(cfg.loss, clf.output)
    if val is None or len(val) == 0:
        cfg = TrainConfig(**{**asdict(cfg), "select_on": "last"})
    fp = fingerprint(cfg, model, data_hash, fold)
    model.to(runtime.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, best_score, best_epoch, bad_epochs = 0, None, -1, 0
    history: list[dict[str, float]] = []
    best_state = copy.deepcopy(model.state_dict())
    if ckpt_path.is_file():
        state = load_file(ckpt_path)
        if state.get("fingerprint") == fp:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, best_score, best_epoch = state["epoch"], state["best_score"], state["best_epoch"]
            bad_epochs, history, best_state = state["bad_epochs"], state["history"], state["best_state"]
            log.info("resuming %s after epoch %d", ckpt_path, start)
        else:
            log.info("ignoring %s: written for another configuration or data", ckpt_path)
    resumed_from = start

    dataset = AugmentedSet(train, clf.spatial_dims, cfg.shift_vox, cfg.rotate_deg)
    for epoch in range(start, cfg.epochs):
        if bad_epochs and cfg.early_stopping_patience and bad_epochs >= cfg.early_stopping_patience:
            break
        seed = epoch_seed(cfg.seed, fold, epoch)
        torch.manual_seed(seed)
        dataset.reseed(seed)
        loader = DataLoader(dataset, batch_size=cfg.batch_size,
                            sampler=balanced_sampler(train.y, seed, cfg.balanced_sampling), num_workers=0)
        model.train()
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"fold {fold} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if progress else True)
        for xb, yb, tb, _ in bar:
            xb, yb, tb = (t.to(runtime.device, non_blocking=True) for t in (xb, yb, tb))
            optimizer.zero_grad(set_to_none=True)
            with runtime.autocast():
                out = model(xb)
            loss = training_loss(out, yb, tb, clf.output, cfg.loss)
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            optimizer.step()
            total += loss.item() * len(xb)
            n += len(xb)
            bar.set_postfix(loss=f"{total / n:.4f}")
        metrics = {"train_loss": total / max(n, 1)}
        if val is not None and len(val):
            metrics.update(_val_metrics(model, val, cfg, runtime))
        improved, score = _improved(cfg, metrics, best_score)
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        history.append({"epoch": epoch, **metrics})
        save_atomic(
            {"fingerprint": fp, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": epoch + 1, "best_score": best_score, "best_epoch": best_epoch,
             "bad_epochs": bad_epochs, "history": history, "best_state": best_state},
            ckpt_path,
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return FoldResult(best_state, best_epoch, history, resumed_from)

"""Every enumerated choice of ``params.yaml`` and the library, defined once.

Each choice is a :data:`~typing.Literal` type (what the settings schema,
:mod:`ctharden.config.schema`, validates against) and a tuple of its values in a fixed order (what
code iterates over and error messages list). Modules that used to spell these values keep their
old constant names as aliases of the tuples here (e.g. ``ctharden.attacks.common.NORMS``).
"""

from __future__ import annotations

from typing import Literal, get_args

#: Perturbation norms of PGD attacks, adversarial training and the gate.
Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = get_args(Norm)

#: Losses a PGD attack ascends (``both``: a CE and a margin run, broken if either breaks).
AttackLoss = Literal["ce", "margin", "both"]
ATTACK_LOSSES: tuple[str, ...] = get_args(AttackLoss)

#: Members of the white-box + black-box attack ensemble (:mod:`ctharden.attacks.ensemble`), in run
#: order: PGD (CE and margin runs), Auto-PGD with each loss, the score-based Square Attack.
EnsembleAttack = Literal["pgd", "apgd-ce", "apgd-margin", "square"]
ENSEMBLE_ATTACKS: tuple[str, ...] = get_args(EnsembleAttack)

#: How an external model expects its input (the model contract, :mod:`ctharden.models.external`):
#: an HU window mapped to [0, 1]; a z-score of HU; display values already in [0, 1].
InputScalingKind = Literal["window", "zscore", "display"]
INPUT_SCALINGS: tuple[str, ...] = get_args(InputScalingKind)

#: What an external model returns: one logit; two logits; a probability of the positive class;
#: C-class logits with the positive class at ``positive_index``.
ExternalOutput = Literal["logit", "logits2", "probability", "classes"]
EXTERNAL_OUTPUTS: tuple[str, ...] = get_args(ExternalOutput)

#: The two NPS-noise attacks (random draws, Algorithm 1's optimised perturbation).
NpsAttack = Literal["random", "optimized"]
NPS_ATTACKS: tuple[str, ...] = get_args(NpsAttack)

#: Hardening methods (``harden.method``, ``harden.compare``).
HardenMethod = Literal["adv", "ima", "rand", "trades", "nps", "adaptive"]
HARDEN_METHODS: tuple[str, ...] = get_args(HardenMethod)
#: The hardening methods that train at an ε (the tune stage searches it).
EpsMethod = Literal["adv", "ima", "rand", "trades"]
EPS_METHODS: tuple[str, ...] = get_args(EpsMethod)

#: Training losses (``train.loss``): squared error on the probability, or cross-entropy.
TrainLoss = Literal["mse", "ce"]
TRAIN_LOSSES: tuple[str, ...] = get_args(TrainLoss)

#: Model selection on the validation fold (``train.select_on``).
SelectOn = Literal["val_auc", "val_loss", "last"]
SELECT_ON: tuple[str, ...] = get_args(SelectOn)

#: Compute device (``train.device``); ``cuda:N`` names one GPU as well.
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)

#: Numeric precision (``train.precision``).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

#: Which models the NPS attacks run on (``robustness.models``).
ModelSet = Literal["selected", "folds"]
MODEL_SETS: tuple[str, ...] = get_args(ModelSet)

#: Dataset splits the NPS attacks run on (``robustness.splits``).
Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = get_args(Split)

#: NPS model kinds (``robustness.noise.model``).
NoiseModelKind = Literal["parametric", "table"]
NOISE_MODELS: tuple[str, ...] = get_args(NoiseModelKind)

#: What eq. 5's projection averages over (``robustness.noise.projection_pool``).
ProjectionPool = Literal["all", "sample", "slice"]
PROJECTION_POOLS: tuple[str, ...] = get_args(ProjectionPool)

#: How NPS noise meets an image's own scan noise (``robustness.noise.mode``): ``additive`` adds the
#: target-mAs NPS noise on top (the paper); ``dose`` adds only the variance a lower-dose rescan of the
#: sample's own scan mAs would add (:mod:`ctharden.noise.dose`).
NoiseMode = Literal["additive", "dose"]
NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)

#: Dataset sources (``datasets.<name>.kind``).
DatasetKind = Literal["lidc", "lidc2d", "covid", "synthetic"]
DATASET_KINDS: tuple[str, ...] = get_args(DatasetKind)

#: Tasks of synthetic datasets (``datasets.<name>.task`` when ``kind: synthetic``).
SyntheticTask = Literal["nodule3d", "covid2d"]
SYNTHETIC_TASKS: tuple[str, ...] = get_args(SyntheticTask)

#: The evaluated variants of a job: its trained baseline and its hardened model.
Variant = Literal["baseline", "hardened"]
VARIANTS: tuple[str, ...] = get_args(Variant)

#: Kinds of gate criteria (each has its own regression tolerance, ``gate.regression``).
GateKind = Literal["clean_auc", "san_rate", "robust_accuracy", "sanity"]
GATE_KINDS: tuple[str, ...] = get_args(GateKind)

#: Confidence-interval methods for a rate (``robustness.intervals.method``, ``gate.method``):
#: exact Clopper–Pearson or Wilson's score interval (:mod:`ctharden.evaluation.intervals`).
IntervalMethod = Literal["clopper-pearson", "wilson"]
INTERVAL_METHODS: tuple[str, ...] = get_args(IntervalMethod)

#: A gate criterion's (and a model's) verdict: decided on one-sided confidence bounds
#: (:mod:`ctharden.gate.criteria`); only ``pass`` registers.
Decision = Literal["pass", "fail", "inconclusive"]
DECISIONS: tuple[str, ...] = get_args(Decision)

#: What error messages call the values of each choice when used as mapping keys.
NOUNS: dict[tuple[str, ...], str] = {
    NORMS: "norms",
    NPS_ATTACKS: "attacks",
    GATE_KINDS: "kinds",
    HARDEN_METHODS: "methods",
    DATASET_KINDS: "dataset kinds",
}

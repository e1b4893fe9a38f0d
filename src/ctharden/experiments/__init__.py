"""Reproductions of the papers' small, self-contained experiments (no CT data needed).

- :func:`run_moons` — ma 2020, section 3.1 / appendix Table 1: IMA vs "ce" vs "adv ε" (and TRADES,
  "rand ε") on sklearn's two-moons data, L∞ 100-PGD accuracy per noise level.
"""

from ctharden.experiments.moons import METHODS, PAPER_TABLE1, moons_mlp, run_moons

__all__ = ["METHODS", "PAPER_TABLE1", "moons_mlp", "run_moons"]

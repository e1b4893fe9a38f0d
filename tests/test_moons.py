"""The Moons experiment (ma 2020, section 3.1) at test size: IMA must beat "ce" under PGD.

The test-sized run uses 2000 training points and make_moons noise 0.1 (the study's default is
0.05): with 10x fewer optimizer steps than the paper's 20000 points, IMA's advantage at ε = 0.2 is
~0.01 at noise 0.05 and not reliable across seeds (IMA lost on 1 of 5 seeds at 2000 points, 1 of 6
at 3000), while at noise 0.1 (points closer to the boundary) IMA won on every seed tried. This
exact configuration, IMA minus ce at ε = 0.2, seeds 0-5: +0.098, +0.010, +0.062, +0.020, +0.082,
+0.062. With IMA broken the gap at seed 0 vanishes and the test fails: β = 0 (plain "ce") +0.000,
margins never expanding past Δε -0.008, no boundary samples (L2 term dropped) -0.010.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctharden.core.errors import ConfigError
from ctharden.studies.moons import PAPER_TABLE1, moons_mlp, run_moons


@pytest.mark.slow
def test_ima_beats_ce_under_pgd_and_writes_outputs(tmp_path: Path) -> None:
    res = run_moons(n_train=2000, n_val=200, n_test=500, epochs=30, noise=0.1, methods="ce,ima",
                    eps_eval=(0.2,), seed=0, out_dir=tmp_path)
    assert res["eps"] == [0.0, 0.2]
    ce, ima = (res["methods"][m]["accuracy"] for m in ("ce", "ima"))
    assert ce[0] >= 0.98 and ima[0] >= 0.98, (ce, ima)  # both fit the (nearly separable) data
    assert ima[1] > ce[1], f"IMA {ima[1]:.3f} vs ce {ce[1]:.3f} at L∞ ε = 0.2"
    m = res["ima"]
    assert 0.0 < m["margin_mean"] <= 0.3 and sum(m["histogram"]["counts"]) == 2000
    for name in ("results.json", "table.md", "decision_boundaries.png", "margins.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "decision_boundaries.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["ima"]["accuracy"] == ima
    table = (tmp_path / "table.md").read_text()
    assert "| ours: IMA |" in table and "| paper: IMA | 1.0000 | 0.9755 |" in table and "paper: MMA" in table


def test_deterministic_with_the_seed() -> None:
    kw = {"n_train": 256, "n_val": 0, "n_test": 64, "epochs": 2, "methods": ("ce", "ima"), "eps_eval": (0.1,),
          "eval_steps": 10}
    a, b = run_moons(seed=3, **kw), run_moons(seed=3, **kw)
    assert [a["methods"][m]["accuracy"] for m in ("ce", "ima")] == [b["methods"][m]["accuracy"] for m in ("ce", "ima")]
    assert a["ima"]["histogram"] == b["ima"]["histogram"]


def test_model_and_bad_input() -> None:
    assert [type(m).__name__ for m in moons_mlp()].count("LayerNorm") == 2
    assert set(PAPER_TABLE1) == {"IMA", "MMA", "TRADES", "adv0.3", "ce"}
    with pytest.raises(ConfigError, match="unknown Moons method"):
        run_moons(methods="ce,foo")
    with pytest.raises(ConfigError, match="n_train"):
        run_moons(n_train=0)


def test_cli_study_moons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ctharden import cli

    runner = CliRunner()
    out = tmp_path / "moons"
    r = runner.invoke(cli.app, ["study", "moons", "--n-train", "200", "--n-test", "40", "--epochs", "2",
                                "--methods", "ce,ima", "--out", str(out), "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "ours: IMA" in r.output and "paper: IMA" in r.output
    assert {p.name for p in out.iterdir()} >= {"results.json", "table.md", "decision_boundaries.png", "margins.png"}

    r = runner.invoke(cli.app, ["study", "moons", "--methods", "foo", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0
    assert isinstance(r.exception, ConfigError) and "'foo'" in str(r.exception) and "ima" in str(r.exception)
    assert not (tmp_path / "bad").exists()
    # through the real entry point: one line on stderr, exit status 1
    monkeypatch.setattr(sys, "argv", ["ctharden", "study", "moons", "--methods", "foo"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "unknown Moons method(s) ['foo']" in err and "Traceback" not in err

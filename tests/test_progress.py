"""Progress bars: drawn on stderr with an ETA when asked (``CTHARDEN_PROGRESS=1``), one display for
nested loops, nothing at all when off; stdout untouched either way."""

from __future__ import annotations

import pytest

from ctharden.core.progress import ENV, enabled, progress


def test_bars_with_eta_on_stderr_and_nested_loops_share_one_display(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV, "1")
    assert enabled()
    with progress(3, "evaluating on lidc2d") as outer:
        for i in range(3):
            with progress(2, "adv fine-tuning") as inner:
                inner(note="loss 0.5")
                inner(note="loss 0.4")
            outer(note=f"unit {i}")
    out, err = capsys.readouterr()
    assert out == ""
    assert "evaluating on lidc2d: unit 2" in err and "3/3" in err and "ETA" in err


def test_no_bars_when_off(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV, "0")
    assert not enabled()
    with progress(2, "tuning") as advance:
        advance()
        advance(note="trial 1 done")
    assert capsys.readouterr() == ("", "")

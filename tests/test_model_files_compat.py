"""Model files written by earlier versions still load and predict the same.

The fixtures were written by ctharden before the layered layout (commit 92bc290, modules
``ctharden.checkpoint`` / ``ctharden.models.registry``) with their outputs on a fixed input; the
file format (``ctharden-model/1``: config + state_dict, no pickled code) must keep loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctharden.models.files import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "model_files"
REFERENCE = json.loads((FIXTURES / "reference_outputs.json").read_text())


@pytest.mark.parametrize("arch", sorted(REFERENCE))
def test_old_model_file_loads_and_predicts_the_same(arch: str) -> None:
    model, meta = load_model(FIXTURES / f"{arch}.pt")
    assert meta["written_by"].startswith("ctharden 0.1.0") and model.arch == arch and not model.training
    g = torch.Generator().manual_seed(1)
    x = torch.rand((2, 32, 32, 32), generator=g) * 1400.0 - 1000.0  # HU, as the fixture's input
    with torch.no_grad():
        out = model(model.to_input(x))
    torch.testing.assert_close(out, torch.tensor(REFERENCE[arch]["output"]), rtol=0, atol=1e-6)

"""Figures are drawn without touching matplotlib's global state (clipforge.plotting)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, sys
from pathlib import Path
import matplotlib
import numpy as np
from clipforge.eval.report import write_confusion_png
from clipforge.train.report import write_loss_plot

out = Path(sys.argv[1])
write_confusion_png(out / "confusion.png", np.eye(3), ["a", "b", "c"])
(out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "samples": 8, "loss": 2.0, "logit_scale": 14.3}))
write_loss_plot(out)
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


@pytest.mark.slow
def test_figures_leave_the_users_backend_alone(tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "svg"}  # a user's choice; the library must not switch it to Agg
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["svg", "False"]  # backend kept, pyplot never imported
    for name in ("confusion.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

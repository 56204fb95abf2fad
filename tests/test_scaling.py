"""`hpcdl scaling` under mpiexec: measured compute and allreduce, and a prediction built on them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trainer_runs import mpiexec

pytestmark = pytest.mark.mpi


def test_scaling_measures_and_predicts(tmp_path):
    out = tmp_path / "scaling.json"
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "hpcdl", "scaling", "--model", "mlp",
                           "--input-shape", "1,28,28", "--per-rank-batch", "16", "--steps", "3",
                           "--algorithm", "ring", "--predict", "1,2,64", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["modelled_algorithm"] == "ring"
    assert result["compute_s"] > 0 and result["allreduce_s"] > 0 and result["allreduce_predicted_s"] > 0
    # mlp: 784*256 + 256 + 256*128 + 128 + 128*10 + 10 parameters, 64-byte aligned segments, float32
    assert result["parameters"] == 235_146
    rows = {row["ranks"]: row for row in result["prediction"]}
    assert sorted(rows) == [1, 2, 64]
    assert rows[1]["efficiency"] == pytest.approx(1.0)  # one rank: nothing to reduce
    assert rows[64]["step_s"] > rows[2]["step_s"] > rows[1]["step_s"]
    assert rows[64]["global_batch"] == 64 * 16
    assert "measured/model" in proc.stdout

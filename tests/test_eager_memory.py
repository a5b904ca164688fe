"""The eager (CPU) kernels never hold one gathered row per entry: a whole training step at
initialisation, at the shape of issue 16 (d = 768, m = 16384, N = 4096), stays within 2 GB.

A JumpReLU dictionary at initialisation tracks half of its latents on every token (~34M
entries here); a decoder gather of d floats per entry would need 98 GiB. Each step runs in a
process of its own (``scripts/bench_eager_memory.py``), whose address space is capped a few GB
past what torch maps, so a regression fails with an error rather than exhausting the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUDGET_BYTES = 2 * 10**9


@pytest.mark.timeout(900)
@pytest.mark.parametrize("architecture", ["jumprelu", "batchtopk"])
def test_an_eager_training_step_at_initialisation_stays_within_2_gb(architecture):
    proc = subprocess.run(
        [sys.executable, "scripts/bench_eager_memory.py", "--architectures", architecture],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert "error" not in record, record
    # The step's memory: the process's peak less the interpreter's and torch's own (~0.55 GB).
    assert record["training_bytes"] <= BUDGET_BYTES, record
    if architecture == "jumprelu":
        assert record["l0"] > 4000, "at initialisation about half of the latents are active"

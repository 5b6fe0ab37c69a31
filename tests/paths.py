"""Where the tests find the repository's files, whatever folder a test module sits in."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
UNIT = ROOT / "tests" / "unit"

# The integration tier's device: cpu here and in CI; scripts/gpu_check.sh sets cuda (capture parity on CUDA).
TEST_DEVICE = os.environ.get("PROBECAL_TEST_DEVICE", "cpu")

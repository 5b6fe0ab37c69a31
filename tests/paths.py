"""Where the tests find the repository's files, whatever folder a test module sits in."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
UNIT = ROOT / "tests" / "unit"

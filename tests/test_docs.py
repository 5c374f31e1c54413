import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current_and_every_field_has_a_reason():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_docs.py")], capture_output=True, text=True,
                         check=True).stdout
    assert out == (ROOT / "docs" / "configs.md").read_text(), "run: python scripts/config_docs.py > docs/configs.md"
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) > 50
    assert not [r for r in rows if r.rstrip().endswith("|  |")], "a config field has no reason comment"

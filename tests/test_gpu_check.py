"""benchmarks/gpu_check.py, the GPU readiness check, runs its whole logic on CPU at a tiny budget: fine-tuned folds
of baseline, XML, GSP and XBN (no feature cache: the whole trunk trains), a timed step, and a smoke fair job."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_on_cpu_tiny(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--iterations", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"baseline", "xml", "gsp", "xbn"}
    for method, row in res["methods"].items():
        assert row["step_ms"] > 0 and 0 <= row["val_map_r"] <= 1, (method, row)
    names = {c["check"] for c in res["checks"]}
    assert "regime" in names and "smoke fair job" in names and all(c["ok"] for c in res["checks"])

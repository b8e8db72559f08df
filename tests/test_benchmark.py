"""benchmark.py end to end: one real OneFlow eager step at the CPU recipe's shapes."""
import json

from conftest import run


def test_benchmark_reports_a_row_and_json(tmp_path):
    out = run("benchmark.py", "--setting", "cpu", "--modes", "eager", "--steps", 1, "--warmup", 0,
              "--json", tmp_path / "bench.json").stdout
    assert "train ms/step" in out and "oneflow 0.9.0" in out
    (result,) = json.loads((tmp_path / "bench.json").read_text())
    assert result["mode"] == "eager" and result["setting"] == "cpu" and result["images"] == 4
    assert result["params"] == 1_942_289 and result["train_s"] > 0 and result["infer_s"] > 0 and result["peak_mb"] > 100


def test_benchmark_rejects_a_missing_torch_interpreter(tmp_path):
    proc = run("benchmark.py", "--torch_python", tmp_path / "nope", check=False)
    assert proc.returncode != 0 and "no such interpreter" in proc.stderr

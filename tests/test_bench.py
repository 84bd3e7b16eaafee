"""The benchmark harness end to end on the real default model (small: 1 prompt, 8 tokens)."""

import json

from conftest import DEV_PROMPTS
from jaxspec.bench import parse_method_spec, run_bench


def test_parse_method_spec():
  assert parse_method_spec("recycling:template=small,k=8") == ("recycling", {"template": "small", "k": 8},
                                                              "recycling:template=small,k=8")


def test_run_bench_writes_json_table_and_plot(tmp_path, capsys):
  out, plot = tmp_path / "b.json", tmp_path / "b.png"
  report = run_bench(methods=("pld:k=2", "recycling:template=tiny"), prompts_path=DEV_PROMPTS, categories=["qa"],
                     per_category=1, max_new_tokens=8, forward_curve=(1, 2), out=str(out), plot=str(plot),
                     progress=False)
  assert json.loads(out.read_text())["summary"].keys() == report["summary"].keys()
  assert list(report["summary"]) == ["ar", "pld:k=2", "recycling:template=tiny"]  # AR baseline added first
  for label, s in report["summary"].items():
    assert s["identical_to_ar"] == "1/1", label
    assert s["overall"]["mat"] >= 1.0 and s["overall"]["speedup"] > 0
  assert set(report["forward_time_curve_s"]) == {"1", "2"}
  assert plot.stat().st_size > 0
  assert "recycling:template=tiny" in capsys.readouterr().out

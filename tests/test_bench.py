"""The benchmark harness end to end on the real default model (small: 1 prompt, 8 tokens), and
the `jaxspec bench` command line (method lists, fail-fast checks before any model is loaded)."""

import json

import pytest

from conftest import DEV_PROMPTS
from jaxspec import cli
from jaxspec.bench import run_bench
from jaxspec.errors import InvalidOptionError, UnknownMethodError
from jaxspec.methods import parse_method_list, parse_method_spec


def test_parse_method_spec():
  assert parse_method_spec("recycling:template=small,k=8") == ("recycling", {"template": "small", "k": 8},
                                                              "recycling:template=small,k=8")
  assert parse_method_spec("draft:drafter=qwen2.5-coder-0.5b-instruct,without_replacement=True")[1] == {
      "drafter": "qwen2.5-coder-0.5b-instruct", "without_replacement": True}
  for bad in ("pld:k", ":k=3", "pld:=3"):
    with pytest.raises(InvalidOptionError):
      parse_method_spec(bad)


def test_method_lists_split_on_spaces_semicolons_and_commas():
  names = lambda s: [label for _, _, label in parse_method_list(s)]
  assert names("ar,pld,recycling") == ["ar", "pld", "recycling"]  # the CLI default of old
  assert names("ar pld:k=3;recycling:template=small,k=8") == ["ar", "pld:k=3", "recycling:template=small,k=8"]
  assert names("pld:k=3,max_ngram=2,recycling") == ["pld:k=3,max_ngram=2", "recycling"]
  with pytest.raises(InvalidOptionError):
    parse_method_list(" ; ")


def test_cli_default_methods_are_real_methods():
  parser = cli.build_parser()
  args = parser.parse_args(["bench", "--prompts", DEV_PROMPTS])
  assert [n for n, _, _ in parse_method_list(args.methods)] == ["ar", "pld", "recycling"]


def test_bench_cli_fails_fast(monkeypatch, capsys):
  import jaxspec
  monkeypatch.setattr(jaxspec, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking options"))
  assert cli.main(["bench", "--prompts", DEV_PROMPTS, "--methods", "ar nope"]) == 2
  assert "unknown method 'nope'" in capsys.readouterr().err
  assert cli.main(["bench", "--prompts", DEV_PROMPTS, "--methods", "pld:kk=3"]) == 2
  assert "bad options for method 'pld'" in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_the_work(monkeypatch, capsys):
  import builtins
  import jaxspec
  real_import = builtins.__import__

  def no_matplotlib(name, *a, **k):
    if name.split(".")[0] == "matplotlib":
      raise ImportError("No module named 'matplotlib'")
    return real_import(name, *a, **k)

  monkeypatch.setattr(builtins, "__import__", no_matplotlib)
  monkeypatch.setattr(jaxspec, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking --plot"))
  assert cli.main(["bench", "--prompts", DEV_PROMPTS, "--plot", "x.png"]) == 2
  assert "pip install 'jaxspec[bench]'" in capsys.readouterr().err


@pytest.mark.slow
def test_run_bench_writes_json_table_and_plot(tmp_path, capsys):
  out, plot = tmp_path / "b.json", tmp_path / "b.png"
  report = run_bench(methods=("pld:k=2",), prompts_path=DEV_PROMPTS, categories=["qa"],
                     per_category=1, max_new_tokens=8, forward_curve=(1, 2), out=str(out), plot=str(plot),
                     progress=False)
  written = json.loads(out.read_text())
  assert written["summary"].keys() == report["summary"].keys()
  assert list(report["summary"]) == ["ar", "pld:k=2"]  # AR baseline added first
  ar = report["summary"]["ar"]["overall"]
  assert ar["mat"] == 1.0 and ar["forwards"] == ar["tokens"]  # prefill + one forward per later token
  for label, s in report["summary"].items():
    assert s["identical_to_ar"] == "1/1", label
    o = s["overall"]
    assert o["tokens"] == ar["tokens"] and o["mat"] == pytest.approx(o["tokens"] / o["forwards"])
    assert o["speedup"] == pytest.approx(o["tokens_per_s"] / ar["tokens_per_s"])
  assert set(report["forward_time_curve_s"]) == {"1", "2"}
  assert all(t > 0 for t in report["forward_time_curve_s"].values())
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert ar["mean_forward_tokens"] == 1.0  # AR: one token per decode forward
  m = written["machine"]
  assert m["cores"] >= 1 and m["cpu_model"] and isinstance(m["isa"], list) and m["device_kind"]
  printed = capsys.readouterr().out
  assert "pld:k=2" in printed and "machine: " in printed and f"{m['cores']} cores" in printed


@pytest.mark.slow
def test_interleaved_methods_keep_their_own_learned_state():
  """Prompts run through every method in turn; two recycling configurations share one memory key
  (the matrix), yet each sees only what it learned itself: the same forwards as running alone."""
  kw = dict(prompts_path=DEV_PROMPTS, categories=["qa", "writing"], per_category=1, max_new_tokens=24, progress=False)
  tiny, small = "recycling:template=tiny,adaptive=False", "recycling:template=small,adaptive=False"
  report = run_bench(methods=(tiny, small), **kw)
  assert set(report["forward_time_curve_s"]) == {"1", "2", "4", "8", "16"}  # by default a bench records the curve
  both = report["runs"]
  alone = run_bench(methods=(small,), **kw)["runs"]
  assert [r["forwards"] for r in both[small]] == [r["forwards"] for r in alone[small]]
  assert [r["accept_hist"] for r in both[small]] == [r["accept_hist"] for r in alone[small]]
  # repeats start from the state before the prompt: the same drafts each time, and the learned
  # state carried to the next prompt is the first run's
  rep = run_bench(methods=(small,), repeats=2, **kw)["runs"][small]
  assert [r["forwards_repeats"] for r in rep] == [[r["forwards"]] * 2 for r in alone[small]]
  assert all(len(r["wall_s_repeats"]) == 2 and r["wall_s"] > 0 for r in rep)

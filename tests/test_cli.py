"""`jaxspec generate` parses `--method name:key=value,...` with the same parser as `jaxspec bench`,
and checks the method and its options before loading any model."""

import pytest

import jaxspec
from jaxspec import cli


@pytest.fixture
def tiny_loaded(monkeypatch, tiny):
  monkeypatch.setattr(jaxspec, "load_model", lambda *a, **k: tiny)
  return tiny


def test_generate_accepts_method_options(tiny_loaded, capsys):
  prompt = "5 6 7 5 6 7 5 6"  # the toy tokenizer reads numbers
  want = jaxspec.generate(tiny_loaded, [[5, 6, 7, 5, 6, 7, 5, 6]], max_new_tokens=6).texts[0]
  assert cli.main(["generate", "--method", "pld:k=3,max_ngram=2", "--no-chat", "--max-new-tokens", "6", prompt]) == 0
  out = capsys.readouterr()
  assert out.out.strip() == want.strip() and "[pld]" in out.err


@pytest.mark.parametrize("method,needle", [("pld:k=0", "pld needs k >= 1"), ("pld:kk=3", "bad options for method"),
                                           ("pld:k", "bad method option"), ("nope:k=1", "unknown method")])
def test_bad_method_specs_fail_before_loading(monkeypatch, capsys, method, needle):
  monkeypatch.setattr(jaxspec, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking --method"))
  assert cli.main(["generate", "--method", method, "hi"]) == 2
  err = capsys.readouterr().err
  assert needle in err and err.count("\n") == 1

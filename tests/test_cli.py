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


def test_train_commands_share_the_schedule_options():
  parser = cli.build_parser()
  ht = parser.parse_args(["train", "hidden-transfer", "--data", "d", "--out", "o"])
  lud = parser.parse_args(["train", "lud", "--data", "d", "--out", "o", "--lr", "2e-4", "--stop-after", "7"])
  assert (ht.steps, ht.batch_size, ht.lr, ht.warmup_steps, ht.eval_every, ht.save_every) == (3000, 64, 1e-3, 100, 250, 250)
  assert (lud.steps, lud.batch_size, lud.lr, lud.warmup_steps, lud.eval_every, lud.save_every, lud.stop_after) == (
      300, 4, 2e-4, 20, 50, 25, 7)
  assert parser.parse_args(["train", "lud", "--data", "d", "--out", "o"]).lr is None  # the mode's default

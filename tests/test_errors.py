"""Every user error raises a JaxspecError subclass with a fix in the message; the CLI prints
one line (no traceback) and exits 2."""

import subprocess
import sys

import pytest

import jaxspec
from jaxspec.errors import (InvalidOptionError, ModelFolderError, ModelNotFoundError,
                            PromptTooLongError, UnknownMethodError)


def test_unknown_model_name():
  with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
    jaxspec.load_model("no-such-model")


def test_incomplete_model_folder(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ModelFolderError):
    jaxspec.load_model(str(tmp_path))


def test_unknown_method_and_bad_options(tiny):
  with pytest.raises(UnknownMethodError, match="ar"):
    jaxspec.generate(tiny, [[3, 4]], method="telepathy")
  with pytest.raises(InvalidOptionError):
    jaxspec.get_method("ar", window=3)
  with pytest.raises(InvalidOptionError):
    jaxspec.generate(tiny, [[3, 4]], max_new_tokens=0)
  with pytest.raises(InvalidOptionError):
    jaxspec.generate(tiny, [[3, 4]], temperature=-0.5)
  with pytest.raises(InvalidOptionError):
    jaxspec.generate(tiny, [[3, 4]], top_p=1.2)
  with pytest.raises(InvalidOptionError):
    jaxspec.generate(tiny, [[3, 999]])  # token id outside the vocabulary


def test_prompt_longer_than_cache(tiny):
  with pytest.raises(PromptTooLongError, match="max_new_tokens"):
    jaxspec.generate(tiny, [[3] * 500], max_new_tokens=100)  # tiny model has 512 positions
  with pytest.raises(PromptTooLongError, match="cache_len"):
    jaxspec.generate(tiny, [[3] * 50], max_new_tokens=20, cache_len=64)


@pytest.mark.parametrize("argv,needle", [
    (["generate", "hi", "--model", "no-such-model"], "no-such-model"),
    (["generate", "hi", "--method", "nope"], "unknown method"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
])
def test_cli_errors_are_one_line(argv, needle):
  r = subprocess.run([sys.executable, "-m", "jaxspec.cli", *argv], capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert "Traceback" not in r.stderr and needle in r.stderr
  assert r.stderr.strip().count("\n") == 0 or r.stderr.strip().splitlines()[-1].startswith("jaxspec: error:")

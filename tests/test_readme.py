"""The README's first command, run literally as a new user would (a subprocess of the installed
`jaxspec` script, next to this interpreter): its answer names Paris."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
  """The shell lines of the README's first code block, comments dropped."""
  block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
  return [l.strip() for l in block.splitlines() if l.strip() and not l.lstrip().startswith("#")]


def test_readme_starts_with_install_generate_then_install_test():
  first, second = readme_commands()[:2]
  assert first.startswith("pip install -e . && jaxspec generate ")
  assert second == 'pip install -e ".[test]" && pytest -q'


@pytest.mark.slow
def test_first_command_answers_paris():
  command = readme_commands()[0].split("&&", 1)[1].strip()  # the install already happened: we run in it
  assert command == 'jaxspec generate "What is the capital of France?"'
  bin_dir = str(Path(sys.executable).parent)  # the venv's `jaxspec` script, as the README's user has it
  env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
  r = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Paris" in r.stdout, r.stdout

"""Self-distillation folders: resumable, refused when the settings or the model differ, and several
folders (greedy + sampled continuations of the same prompts) read as one corpus whose eval split
never puts one prompt on both sides."""

import json

import numpy as np
import pytest

from conftest import make_tiny_bundle
from jaxspec.distill import MANIFEST, SEQUENCES, distill, read_distilled, read_sequences
from jaxspec.errors import InvalidOptionError
from jaxspec.train.data import ArrayDataset, held_out_groups


@pytest.fixture(scope="module")
def tiny():
  return make_tiny_bundle(seed=5)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
  rows = [{"question_id": i, "category": c, "turns": [t]}
          for i, (c, t) in enumerate([("a", "5 6 7"), ("a", "8 9 10 11"), ("b", "12 13")])]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_distill_resumes_and_refuses_other_settings(tiny, prompts, tmp_path):
  out = tmp_path / "greedy"
  distill(tiny, prompts, out, max_new_tokens=6, batch_size=2, progress=False)
  rows = read_sequences(out)
  assert sorted(r["question_id"] for r in rows) == [0, 1, 2] and all(len(r["output_ids"]) == 6 for r in rows)
  # a run killed mid-write: its partial last line is dropped, its prompt done again, nothing twice
  lines = (out / SEQUENCES).read_text().splitlines(keepends=True)
  (out / SEQUENCES).write_text("".join(lines[:-1]) + lines[-1][:10])
  distill(tiny, prompts, out, max_new_tokens=6, batch_size=2, progress=False)
  again = read_sequences(out)
  assert sorted(r["question_id"] for r in again) == [0, 1, 2]
  assert {r["question_id"]: r["output_ids"] for r in again} == {r["question_id"]: r["output_ids"] for r in rows}
  with pytest.raises(InvalidOptionError, match="max_new_tokens"):
    distill(tiny, prompts, out, max_new_tokens=7, progress=False)


def test_a_second_writer_is_refused(tiny, prompts, tmp_path):
  from jaxspec.distill import _writer_lock
  (tmp_path / "d").mkdir()
  with _writer_lock(tmp_path / "d"):  # another run holds the folder
    with pytest.raises(InvalidOptionError, match="another `jaxspec distill` is writing"):
      distill(tiny, prompts, tmp_path / "d", max_new_tokens=4, progress=False)
  distill(tiny, prompts, tmp_path / "d", max_new_tokens=4, progress=False)  # released: it runs
  assert len(read_sequences(tmp_path / "d")) == 3


def test_several_folders_read_as_one_corpus(tiny, prompts, tmp_path):
  distill(tiny, prompts, tmp_path / "greedy", max_new_tokens=6, progress=False)
  distill(tiny, prompts, tmp_path / "sampled", max_new_tokens=6, temperature=0.9, progress=False)
  manifest, rows = read_distilled([tmp_path / "greedy", tmp_path / "sampled"], tiny)
  assert len(rows) == 6 and [m["temperature"] for m in manifest["sources"]] == [0.0, 0.9]
  one, alone = read_distilled(tmp_path / "greedy", tiny)
  assert one == json.loads((tmp_path / "greedy" / MANIFEST).read_text()) and alone == rows[:3]
  with pytest.raises(InvalidOptionError, match="not this"):
    read_distilled([tmp_path / "greedy"], make_tiny_bundle(seed=6))  # another model's weights
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / MANIFEST).write_text((tmp_path / "greedy" / MANIFEST).read_text())
  with pytest.raises(InvalidOptionError, match="no distilled sequences"):
    read_distilled([tmp_path / "greedy", tmp_path / "empty"], tiny)
  with pytest.raises(InvalidOptionError, match="not a distillation folder"):
    read_distilled([tmp_path / "nowhere"], tiny)


def test_group_split_keeps_each_prompt_on_one_side():
  groups = [f"q{i % 20}" for i in range(60)]  # three continuations of each of 20 prompts
  is_eval = held_out_groups(groups, 0.1, seed=3)
  held = {g for g, e in zip(groups, is_eval) if e}
  assert len(held) == 2 and all(e == (g in held) for g, e in zip(groups, is_eval))
  data = ArrayDataset({"x": np.arange(60)})
  train, ev = data.split(0.1, seed=3, groups=groups)
  assert sorted(ev.arrays["x"].tolist()) == np.nonzero(is_eval)[0].tolist() and len(train) == 54

"""The measured forward-time curve: one measurement run per curve (adding a size re-times every
size together, so ratios never mix a busy and a quiet spell), kept on disk beside the model,
never falling as T grows."""

import dataclasses

import pytest

from conftest import make_tiny_bundle
from jaxspec import profiling


@pytest.fixture
def timed(monkeypatch):
  """A fake clock: each size takes `speed[T]` seconds; records which sizes each run timed."""
  runs, speed = [], {}

  def fake_measure(bundle, todo, context, repeats):
    runs.append(list(todo))
    return {T: speed[T] for T in todo}

  monkeypatch.setattr(profiling, "_measure", fake_measure)
  monkeypatch.setenv(profiling.DISK_ENV, "rw")  # the suite runs read-only (conftest); these test writing
  return runs, speed


def test_a_new_size_retimes_the_whole_curve_and_dips_are_flattened(tmp_path, timed):
  runs, speed = timed
  folder = tmp_path / "model"
  folder.mkdir()
  bundle = lambda: dataclasses.replace(make_tiny_bundle(), path=str(folder))  # fresh memory: reads the disk
  speed.update({1: 1.0, 4: 2.0})
  assert profiling.forward_time_curve(bundle(), (1, 4)) == {1: 1.0, 4: 2.0}
  assert profiling.forward_time_curve(bundle(), (4,)) == {4: 2.0} and runs == [[1, 4]]  # from disk
  speed.update({1: 0.5, 4: 1.0, 8: 0.8})  # the machine got quieter; T=8 a noisy dip
  b = bundle()
  assert profiling.forward_time_curve(b, (1, 8)) == {1: 0.5, 8: 1.0}
  assert runs[-1] == [1, 4, 8]  # every size timed again, together
  assert profiling.forward_time_curve(b, (1, 4, 8)) == {1: 0.5, 4: 1.0, 8: 1.0} and len(runs) == 2


def test_refresh_retimes_every_known_size_and_the_disk_modes(tmp_path, timed, monkeypatch):
  runs, speed = timed
  folder = tmp_path / "model"
  folder.mkdir()
  bundle = lambda: dataclasses.replace(make_tiny_bundle(), path=str(folder))
  speed.update({1: 1.0, 4: 2.0, 8: 3.0})
  profiling.forward_time_curve(bundle(), (1, 4, 8))
  speed.update({1: 0.5, 4: 0.75, 8: 1.0})
  assert profiling.forward_time_curve(bundle(), (1,), refresh=True) == {1: 0.5}
  assert runs[-1] == [1, 4, 8]  # the cached sizes were re-timed with it
  assert profiling.forward_time_curve(bundle(), (4, 8)) == {4: 0.75, 8: 1.0} and len(runs) == 2  # replaced on disk
  monkeypatch.setenv(profiling.DISK_ENV, "read")
  speed.update({1: 9.0, 4: 9.0, 8: 9.0})
  assert profiling.forward_time_curve(bundle(), (1, 4, 8), refresh=True) == {1: 9.0, 4: 9.0, 8: 9.0}
  assert profiling.forward_time_curve(bundle(), (4,)) == {4: 0.75}  # not written: a new process reads the old
  monkeypatch.setenv(profiling.DISK_ENV, "off")
  assert profiling.forward_time_curve(bundle(), (4,)) == {4: 9.0} and runs[-1] == [4]  # not read either
  monkeypatch.setenv(profiling.DISK_ENV, "sometimes")
  with pytest.raises(ValueError, match="rw, read or off"):
    profiling.forward_time_curve(bundle(), (2,))

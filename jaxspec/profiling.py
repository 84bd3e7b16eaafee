"""Device forward time as a function of the number of tokens in one forward.

Measured once per model and device: kept in `bundle.method_memory` and, when the bundle was
loaded from a folder, on disk beside the model (`.jaxspec-forward-times.json`, keyed by device
kind, device count/mesh, jax version, dtype, context length and where the weights live), so later
processes reuse it. `JAXSPEC_FORWARD_TIMES=read` never writes that file (the test suite: two
workers timing at once would leave a curve of a busy machine for every later run), `off` neither
reads nor writes it. `jaxspec bench` re-times the curve at its start (`refresh=True`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.models.kv_cache import init_cache

CURVE_KEY = "forward_time_curve"
CURVE_FILE = ".jaxspec-forward-times.json"
DISK_ENV = "JAXSPEC_FORWARD_TIMES"  # "rw" (default), "read" or "off"


def _disk_mode() -> str:
  mode = os.environ.get(DISK_ENV, "rw").strip().lower() or "rw"
  if mode not in ("rw", "read", "off"):
    raise ValueError(f"{DISK_ENV}={mode!r}: use rw, read or off")
  return mode


def curve_key(bundle, context: int) -> str:
  """What a measured curve depends on: the device, the software, the numbers' type, where the
  weights live in host memory."""
  mesh = getattr(bundle, "mesh", None)
  where = ",".join(f"{k}={v}" for k, v in mesh.shape.items()) if mesh is not None else "1"
  host = "|weights=huge-pages" if getattr(bundle, "huge_pages", False) else ""
  return (f"v5|{jax.devices()[0].device_kind}|devices={where}|jax={jax.__version__}|"
          f"dtype={jnp.dtype(bundle.dtype).name}|context={context}{host}")


def _disk_path(bundle) -> Path | None:
  path = getattr(bundle, "path", None)
  return Path(path) / CURVE_FILE if path is not None and Path(path).is_dir() else None


def _read_disk(bundle, key: str) -> dict[int, float]:
  path = _disk_path(bundle) if _disk_mode() != "off" else None
  try:
    return {int(t): float(s) for t, s in json.loads(path.read_text()).get(key, {}).items()} if path else {}
  except (OSError, ValueError, AttributeError):
    return {}  # missing or unreadable: measure again


def _write_disk(bundle, key: str, curve: dict[int, float]) -> None:
  path = _disk_path(bundle) if _disk_mode() == "rw" else None
  if path is None or jax.process_index() != 0:
    return
  try:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = {str(t): s for t, s in sorted(curve.items())}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # atomic: a reader never sees half a file
  except (OSError, ValueError):
    pass  # a read-only model folder: the curve stays in memory


def forward_time_curve(bundle, sizes, context: int = 128, repeats: int = 9,
                       refresh: bool = False) -> dict[int, float]:
  """Median seconds of one decode forward of T tokens (tree mask = causal) after `context`
  committed tokens, for each T in sizes (batch 1). Cached per bundle and on disk (see above).

  Every size of a curve is timed in the same interleaved rounds: when a size is missing, the
  whole curve (cached sizes and new ones) is measured again, so ratios between sizes never mix
  a busy spell of the machine with a quiet one. Returned times never fall as T grows (each is
  the largest time measured at or below its size: a dip is measurement noise, and a method
  would otherwise favour it). `refresh`: time every size now (the requested ones and every size
  already cached for this key) and replace what was cached."""
  key = curve_key(bundle, context)
  memory = bundle.method_memory.setdefault(CURVE_KEY, {})
  want = sorted({int(t) for t in sizes})
  if refresh or not set(want) <= set(memory.get(key, {})):
    disk = _read_disk(bundle, key)
    if set(want) <= set(disk) and not refresh:
      memory[key] = disk
    else:
      union = sorted(set(want) | set(disk) | set(memory.get(key, {})))
      memory[key] = _measure(bundle, union, context, repeats)
      _write_disk(bundle, key, memory[key])
  curve = memory[key]
  ordered = sorted(curve)
  running = np.maximum.accumulate([curve[t] for t in ordered])
  monotone = dict(zip(ordered, (float(x) for x in running)))
  return {int(t): monotone[int(t)] for t in sizes}


IN_LOOP = 4  # forwards per timed call: the curve is the in-loop cost, as inside the decode loop


def _measure(bundle, todo: list[int], context: int, repeats: int) -> dict[int, float]:
  """Median seconds per size, all sizes compiled first, then timed in interleaved rounds.

  Each timed call runs IN_LOOP forwards in one jitted `fori_loop` (each forward's input depends
  on the previous one's logits, so none is hoisted) and counts a forward as the call's time over
  IN_LOOP: the cost a forward has inside the decode loop. One dispatched forward per call added
  a fixed 15-18 ms on a slow day (T=1 49.5 vs 31.2 ms in a loop; the AR loop's step 31.4 ms),
  which flattened the curve (T=4 1.19x instead of 1.59x) and made every sized method over-draft
  (experiments/LOG.md, session 17)."""
  graphdef = bundle.graphdef

  @jax.jit
  def forwards(params, cache, tokens_BxT, mask_TxT):
    model = nnx.merge(graphdef, params)
    T = tokens_BxT.shape[1]
    pos = cache.lengths[:, None] + jnp.arange(T)[None]

    def one(_, last):
      tokens = tokens_BxT + (last > 1e30).astype(jnp.int32)  # a data dependency, never true
      return model(cache, tokens, pos, mask_TxT)[0][0, -1, 0]

    return jax.lax.fori_loop(0, IN_LOOP, one, jnp.zeros((), jnp.float32))

  slots = context + max(todo, default=1) + 1
  slots = -(-slots // 128) * 128
  cache = init_cache(bundle.config, 1, slots, bundle.dtype).replace(lengths=jnp.asarray([context], jnp.int32))
  inputs = {T: (jnp.ones((1, T), jnp.int32), jnp.tril(jnp.ones((T, T), bool))) for T in todo}
  for T in todo:  # compile (and warm) every size first
    jax.block_until_ready(forwards(bundle.params, cache, *inputs[T]))
  times = {T: [] for T in todo}
  for _ in range(repeats):  # interleaved rounds: a slow spell of the machine hits every size alike
    for T in todo:
      t0 = time.perf_counter()
      jax.block_until_ready(forwards(bundle.params, cache, *inputs[T]))
      times[T].append((time.perf_counter() - t0) / IN_LOOP)
  return {T: float(np.median(times[T])) for T in todo}

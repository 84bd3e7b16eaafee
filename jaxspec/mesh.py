"""Device meshes: multi-host init, the ("data", "model") mesh, and its text form for CLIs.

    mesh = jaxspec.mesh.make_mesh(data=2, model=4)        # or make_mesh(**parse_mesh("2x4"))
"""

from __future__ import annotations

import os

import jax
from jax.sharding import AxisType, Mesh

from jaxspec.errors import InvalidOptionError

MESH_AXES = ("data", "model")


def initialize_distributed(enable: bool | None = None) -> bool:
  """Run `jax.distributed.initialize()` when asked (enable=True, or env JAXSPEC_DISTRIBUTED=1).

  Coordinator, process count and id come from the cluster (Cloud TPU, SLURM, ... are detected
  by JAX) or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Must run before
  any other JAX call. Returns whether JAX runs distributed. Idempotent.
  """
  if enable is None:
    enable = os.environ.get("JAXSPEC_DISTRIBUTED", "").lower() in ("1", "true", "yes")
  if not enable:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process only
  jax.distributed.initialize(**kwargs)
  return True


def parse_mesh(text: str) -> dict[str, int]:
  """"data=2,model=4" (or "2x4", data x model) -> {"data": 2, "model": 4}. Either axis may be
  left out ("model=8"): make_mesh fills it with the remaining devices."""
  text = text.strip().lower()
  out: dict[str, int] = {}
  try:
    if "=" not in text:
      data, model = text.split("x")
      out = {"data": int(data), "model": int(model)}
    else:
      for part in text.split(","):
        name, value = (s.strip() for s in part.split("="))
        if name not in MESH_AXES or name in out:
          raise ValueError(name)
        out[name] = int(value)
  except ValueError:
    raise InvalidOptionError(f"bad mesh {text!r}; write it as data=2,model=4 (or 2x4)") from None
  if any(v < 1 for v in out.values()):
    raise InvalidOptionError(f"mesh axis sizes must be >= 1, got {text!r}; e.g. data=2,model=4")
  return out


def make_mesh(data: int | None = None, model: int | None = None, *, devices=None,
              axis_types: str = "auto") -> Mesh:
  """A ("data", "model") mesh. Missing sizes take the remaining devices (both missing: all
  devices on `model`). On one host a mesh smaller than the device count uses the first devices.

  axis_types="auto" (default) lets XLA propagate the boundary shardings through the model;
  "explicit" gives sharding-in-types meshes (the model code does not annotate for those).
  """
  initialize_distributed()
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data is None and model is None:
    data, model = 1, n
  elif data is None:
    data = max(n // model, 1)
  elif model is None:
    model = max(n // data, 1)
  if data * model > n or (data * model < n and jax.process_count() > 1):
    raise InvalidOptionError(f"mesh data={data},model={model} needs {data * model} devices, "
                             f"{n} available; pick sizes whose product is {n}")
  kinds = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
  if axis_types not in kinds:
    raise InvalidOptionError(f"axis_types must be 'auto' or 'explicit', got {axis_types!r}")
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(kinds[axis_types],) * 2,
                       devices=devices[: data * model])

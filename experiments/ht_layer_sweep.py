"""Hidden-transfer heads: per-offset top-1 / top-5 agreement with the base model against the
transfer layer t (the paper's analysis) and against k, each trained briefly on the same
distilled data. Resumable (each point has its own workdir; finished points are kept in the
JSON). Writes experiments/results/ht_layer_sweep.json and .png.

    python experiments/ht_layer_sweep.py --data runs/distill --layers 14,20,24,26,28 --ks 2,4,6 --steps 400
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "ht_layer_sweep.json"


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2-135m-instruct")
  ap.add_argument("--data", required=True)
  ap.add_argument("--layers", default="14,20,24,26,28")
  ap.add_argument("--k", type=int, default=4, help="k for the layer sweep")
  ap.add_argument("--ks", default="2,4,6", help="k values at --k-layer")
  ap.add_argument("--k-layer", type=int, default=26)
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--workdir", default="runs/ht_sweep")
  args = ap.parse_args()

  import jaxspec
  from jaxspec.distill import read_sequences
  from jaxspec.machine import machine_info
  from jaxspec.train import TrainConfig
  from jaxspec.train.hidden_transfer import load_or_build_store, train_heads

  bundle = jaxspec.load_model(args.model, progress=False)
  rows = read_sequences(args.data)
  result = json.loads(OUT.read_text()) if OUT.exists() else {}
  result.update({"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "sequences": len(rows),
                 "machine": machine_info()})
  points = result.setdefault("points", {})
  plan = [(int(t), args.k) for t in args.layers.split(",")] + [(args.k_layer, int(k)) for k in args.ks.split(",")]
  for layer, k in plan:
    key = f"t{layer}_k{k}"
    if key in points and points[key].get("steps") == args.steps:
      continue
    store = load_or_build_store(bundle, rows, layer, 256, 32, args.data)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=50,
                      eval_every=args.steps, save_every=args.steps)
    _, log, meta = train_heads(bundle, store, k, cfg, Path(args.workdir) / key)
    acc = np.asarray(meta["eval"]["accept_by_offset_slot"])
    points[key] = {"layer": layer, "k": k, "steps": args.steps, "eval_kl": meta["eval"]["kl"],
                   "top1": acc[:, 0].tolist(), "top5": acc.sum(axis=1).tolist(),
                   "train_seconds": meta["train"]["seconds"]}
    print(key, "top1", " ".join(f"{a:.2f}" for a in acc[:, 0]), "top5", " ".join(f"{a:.2f}" for a in acc.sum(1)))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
  plot(result, OUT.with_suffix(".png"), args.k, args.k_layer)
  return 0


def plot(result: dict, path: Path, k: int, k_layer: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pts = result["points"].values()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  by_layer = sorted((p for p in pts if p["k"] == k), key=lambda p: p["layer"])
  for i in range(k):
    axes[0].plot([p["layer"] for p in by_layer], [p["top1"][i] for p in by_layer], "o-", label=f"offset {i + 1} top-1")
    axes[0].plot([p["layer"] for p in by_layer], [p["top5"][i] for p in by_layer], "x--", label=f"offset {i + 1} top-5")
  axes[0].set_xlabel("transfer layer t"), axes[0].set_ylabel("agreement with the base model"), axes[0].legend(fontsize=6)
  by_k = sorted((p for p in pts if p["layer"] == k_layer), key=lambda p: p["k"])
  for p in by_k:
    axes[1].plot(range(1, p["k"] + 1), p["top1"], "o-", label=f"k={p['k']} top-1")
  axes[1].set_xlabel("offset"), axes[1].set_ylabel("top-1 agreement"), axes[1].legend(fontsize=7)
  fig.suptitle(f"{result['model']}: hidden-transfer heads, {result['steps']} steps each")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


if __name__ == "__main__":
  raise SystemExit(main())

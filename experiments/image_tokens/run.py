"""Image tokens end to end: train (or resume) a small decoder on procedural 16x16 palette images,
then sample grids with AR and with SJD under each init strategy, and report

* step compression: target forwards of AR / target forwards of SJD (same rows),
* wall-clock speedup at batch 1 (one image per class, sequentially) and for the whole batch,
* a distribution check against AR: per-position colour histograms (mean total variation
  distance, with an AR-vs-AR baseline) and a two-sample permutation test over images
  (statistic: summed per-position TV distance; labels permuted within each class),
* a PNG sheet of samples.

  python experiments/image_tokens/run.py            # ~5 min training on CPU, then sampling

Results: experiments/results/image_tokens.json and image_tokens_samples.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import data  # noqa: E402
import jaxspec  # noqa: E402
import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"
INITS = ("random", "repeat", "prompt", "ngram", "left", "above")


def sample(bundle, method, opts, per_class, seed, temperature):
  """Rows: per_class images of every class. Returns (pixels [N, 256], stats)."""
  prompts = [[data.NUM_COLOURS + c] for c in range(data.NUM_CLASSES) for _ in range(per_class)]
  out = jaxspec.generate(bundle, prompts, method=method, method_options=opts, max_new_tokens=data.SIZE ** 2,
                         temperature=temperature, seed=seed)
  pix = np.array([ids for ids in out.token_ids], np.int64)
  assert pix.shape == (len(prompts), data.SIZE ** 2), pix.shape
  return pix, out.stats


def batch1_wall(bundle, method, opts, seed, temperature):
  """Seconds (compile excluded) to sample one image per class, one at a time, and forwards used."""
  wall, fwd = 0.0, 0
  for c in range(data.NUM_CLASSES):
    out = jaxspec.generate(bundle, [[data.NUM_COLOURS + c]], method=method, method_options=opts,
                           max_new_tokens=data.SIZE ** 2, temperature=temperature, seed=seed + c)
    wall += out.stats.wall_s
    fwd += sum(out.stats.forwards)
  return wall, fwd


def onehot(pix_Nx256):
  return np.eye(data.NUM_COLOURS)[np.clip(pix_Nx256, 0, data.NUM_COLOURS - 1)]


def tv_per_position(a_Nx256, b_Mx256) -> np.ndarray:
  """[256] total variation distance between the two sets' colour histograms at each position."""
  return 0.5 * np.abs(onehot(a_Nx256).mean(0) - onehot(b_Mx256).mean(0)).sum(-1)


def permutation_test(a, b, classes, n_perm=500, seed=0):
  """Two-sample test over images: statistic = summed per-position TV distance; labels permuted
  within each class (both sets hold the same number of images per class). Returns (stat, p)."""
  rng = np.random.default_rng(seed)
  stat = tv_per_position(a, b).sum()
  both, cls2 = np.concatenate([a, b]), np.concatenate([classes, classes])
  n = len(a)
  hits = 0
  for _ in range(n_perm):
    idx_a, idx_b = [], []
    for c in np.unique(classes):
      members = rng.permutation(np.nonzero(cls2 == c)[0])
      half = len(members) // 2
      idx_a.append(members[:half])
      idx_b.append(members[half:])
    hits += tv_per_position(both[np.concatenate(idx_a)], both[np.concatenate(idx_b)]).sum() >= stat
  assert sum(map(len, idx_a)) == n
  return float(stat), (hits + 1) / (n_perm + 1)


def save_sheet(rows: dict, path: Path, per_class: int):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = data.NUM_CLASSES * 2
  fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.8, len(rows) * 0.9))
  for r, (name, pix) in enumerate(rows.items()):
    for j in range(cols):
      c, k = divmod(j, 2)
      ax = axes[r, j]
      ax.imshow(data.to_rgb(pix[c * per_class + k]), interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
      if r == 0:
        ax.set_title(data.CLASSES[c], fontsize=6) if k == 0 else None
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ckpt-dir", type=Path, default=Path.home() / ".cache" / "jaxspec" / "image_tokens_ckpt")
  ap.add_argument("--steps", type=int, default=1500, help="target training steps (resumes from checkpoints)")
  ap.add_argument("--minutes", type=float, default=5.0, help="training time budget of this run")
  ap.add_argument("--per-class", type=int, default=16, help="sampled images per class and method")
  ap.add_argument("--window", type=int, default=16, help="SJD window L")
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--inits", default=",".join(INITS))
  ap.add_argument("--out", type=Path, default=RESULTS / "image_tokens.json")
  args = ap.parse_args()

  bundle, train_info = train.train(args.ckpt_dir, args.steps, args.minutes)
  print("training:", train_info, flush=True)
  classes = np.repeat(np.arange(data.NUM_CLASSES), args.per_class)
  T = args.temperature

  ar, ar_stats = sample(bundle, "ar", None, args.per_class, seed=1, temperature=T)
  ar2, _ = sample(bundle, "ar", None, args.per_class, seed=2, temperature=T)
  ar_b1_wall, ar_b1_fwd = batch1_wall(bundle, "ar", None, 100, T)
  base_stat, base_p = permutation_test(ar, ar2, classes)
  results = dict(
      model=dict(config=train.CONFIG.__dict__, params=int(sum(x.size for x in jax.tree.leaves(bundle.params)))),
      training=train_info, temperature=T, window=args.window, grid_width=data.SIZE, per_class=args.per_class,
      backend=jax.default_backend(),
      ar=dict(forwards=int(sum(ar_stats.forwards)), wall_s=ar_stats.wall_s, batch1_wall_s=ar_b1_wall,
              compile_s=ar_stats.compile_s, ar_vs_ar=dict(mean_tv=float(tv_per_position(ar, ar2).mean()),
                                                          perm_stat=base_stat, perm_p=base_p)),
      sjd={})
  sheet = {"AR": ar}
  for init in args.inits.split(","):
    opts = dict(L=args.window, init=init, w=data.SIZE)
    pix, st = sample(bundle, "sjd", opts, args.per_class, seed=1, temperature=T)
    b1_wall, b1_fwd = batch1_wall(bundle, "sjd", opts, 100, T)
    stat, p = permutation_test(ar, pix, classes)
    row = dict(forwards=int(sum(st.forwards)), step_compression=sum(ar_stats.forwards) / sum(st.forwards),
               mat=st.tokens_per_forward, batch1_step_compression=ar_b1_fwd / b1_fwd,
               wall_s=st.wall_s, speedup_batch=ar_stats.wall_s / st.wall_s,
               batch1_wall_s=b1_wall, speedup_batch1=ar_b1_wall / b1_wall, compile_s=st.compile_s,
               accept_hist=st.accept_hist, mean_tv_vs_ar=float(tv_per_position(ar, pix).mean()),
               perm_stat=stat, perm_p=p)
    results["sjd"][init] = row
    sheet[f"SJD {init}"] = pix
    print(init, json.dumps({k: v for k, v in row.items() if k != "accept_hist"}), flush=True)
  best = max(results["sjd"], key=lambda k: results["sjd"][k]["step_compression"])
  results["best_init"] = best
  args.out.parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1, default=str)
  png = args.out.with_name(args.out.stem + "_samples.png")
  save_sheet(sheet, png, args.per_class)
  print(f"best init {best}: step compression {results['sjd'][best]['step_compression']:.2f}x; "
        f"wrote {args.out} and {png}")


if __name__ == "__main__":
  main()

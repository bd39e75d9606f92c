"""Figures of Sec. 5.3-5.5 (Fig. 3a-c) as PNG files, with matplotlib's file-only backend."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def transfer_scatter(similarity: np.ndarray, ari: np.ndarray, corr: Mapping, path: str,
                     title: str = 'Fig. 3a: task transferability') -> None:
  """Parameter similarity (x) vs ARI (y) over (source, target) pairs, with the correlations."""
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.scatter(similarity, ari, s=14, alpha=0.7)
  if np.ptp(similarity) > 0:
    slope, icpt = np.polyfit(similarity, ari, 1)
    xs = np.linspace(similarity.min(), similarity.max(), 2)
    ax.plot(xs, slope * xs + icpt, 'k--', lw=1)
  ax.set_xlabel('parameter similarity (mean cosine, source vs target models)')
  ax.set_ylabel('transferability (ARI of 2-means)')
  ax.set_title(f'{title}\nSpearman {corr["spearman"]:.2f} (p={corr["spearman_p"]:.3g}), '
               f'Pearson {corr["pearson"]:.2f} (p={corr["pearson_p"]:.3g})', fontsize=9)
  _save(fig, path)


def branch_bars(branches: Sequence[int], top1: Sequence[float], chance: float, path: str,
                title: str = 'Fig. 3b: one branch at a time') -> None:
  """Top-1 accuracy (%) per branch (1-based) with the chance line."""
  fig, ax = plt.subplots(figsize=(7, 3.5))
  x = np.arange(len(branches))
  ax.bar(x, 100 * np.asarray(top1), color='tab:blue')
  ax.set_xticks(x, [str(b) for b in branches])
  ax.axhline(100 * chance, color='r', ls='--', lw=1, label=f'random ({100 * chance:.1f}%)')
  ax.set_xlabel('branch (conv layer)')
  ax.set_ylabel('top-1 accuracy (%)')
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  _save(fig, path)


def alignment_bars(branches: Sequence[int], variants: Mapping[str, Sequence[float]],
                   chance: float, path: str,
                   title: str = 'Fig. 3c: alignment ablation') -> None:
  """Grouped bars: top-1 (%) per branch for each alignment variant, with the chance line."""
  fig, ax = plt.subplots(figsize=(9, 3.5))
  x = np.arange(len(branches))
  width = 0.8 / max(len(variants), 1)
  for i, (label, top1) in enumerate(variants.items()):
    ax.bar(x + (i - (len(variants) - 1) / 2) * width, 100 * np.asarray(top1), width, label=label)
  ax.axhline(100 * chance, color='r', ls='--', lw=1, label='random')
  ax.set_xticks(x, [str(b) for b in branches])
  ax.set_xlabel('branch (conv layer)')
  ax.set_ylabel('top-1 accuracy (%)')
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, ncol=5)
  _save(fig, path)

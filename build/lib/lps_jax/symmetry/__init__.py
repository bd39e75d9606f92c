"""Permutation symmetry as data (Git Re-Basin specs) and the one weight matcher."""

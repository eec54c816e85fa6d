"""Running ranks: the launcher, the per-rank trainer, `folding train` and `folding verify`, and
the byte corpus they read."""

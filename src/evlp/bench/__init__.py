"""``evlp bench``: measurements of the toolkit itself (``train``: one full training step, vs open_clip)."""

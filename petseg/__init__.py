"""petseg: reproducible pet segmentation, from warehouse to a served model."""

__version__ = "0.1.0"

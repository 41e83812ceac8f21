"""layerprobe: attentive layer fusion (ALF) probes over frozen Vision Transformers.

The library holds the science (pure functions over images, features and probes); `flows/` orchestrates it
with Prefect, DVC decides what is stale and MLflow records every run. See README.md for the two commands.
"""

__version__ = "0.1.0"

"""layerprobe: attentive layer fusion (ALF) probes over frozen Vision Transformers.

The library holds the science (pure functions over images, features and probes); `flows/` orchestrates it
with Prefect, DVC decides what is stale and MLflow records every run. See README.md for the two commands.
"""

import os

# Before torch loads OpenMP: threads waiting at the end of a parallel region sleep instead of spinning. On a machine
# that something else keeps busy, spinning threads burn the time slices of the thread they wait for, and the small
# models of the offline suite slowed down up to 15x; measured by benchmarks/wait_policy.py. A user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

"""Prefect flows: one per pipeline stage, plus `pipeline` (all stages) and `serve` (on a schedule).

Flows hold no science: each task calls one `layerprobe.steps` function with explicit arguments and passes on
paths and content hashes. DVC stages call these flows (`python -m flows.<stage>`); flows never call DVC.
"""

import os

# Set here, in the package, so it runs before any flow module imports prefect (Prefect reads its settings once, at
# import): telemetry cannot reach out from our machines, and a server on a busy machine, or a first start that
# migrates a fresh database, can take longer than Prefect's default 20 s to answer (the run would fail at once).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

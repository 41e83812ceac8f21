"""Prefect flows: one per pipeline stage, plus `pipeline` (all stages) and `serve` (on a schedule).

Flows hold no science: each task calls one `layerprobe.workflow` function with explicit arguments and passes on
paths and content hashes. DVC stages call these flows (`python -m flows.<stage>`); flows never call DVC.
"""

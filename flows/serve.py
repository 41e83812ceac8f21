"""Serve the pipeline on the cron schedule from params (`flow.serve.cron`), e.g. nightly re-evaluation.

Run:  python -m flows.serve [--params params.yaml]
Keeps a process running that starts `pipeline` at each scheduled time (Prefect `serve`); stop it with Ctrl-C.
Point PREFECT_API_URL at a Prefect server (`prefect server start`) to see the schedule and runs in its UI.
"""

from __future__ import annotations

import prefect
from prefect.deployments.runner import RunnerDeployment

from flows.common import load_params, parse_stage_args
from flows.pipeline import pipeline


def scheduled_deployment(params_path: str = "params.yaml") -> RunnerDeployment:
    """The pipeline as a deployment named and scheduled by params' `flow.serve`."""
    params = load_params(params_path)
    return pipeline.to_deployment(
        name=params.flow.serve.name, cron=params.flow.serve.cron, parameters={"params_path": params_path}
    )


if __name__ == "__main__":
    args = parse_stage_args(__doc__.splitlines()[0])
    prefect.serve(scheduled_deployment(args.params))

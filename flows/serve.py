"""Serve the pipeline on the cron schedule from params (`flow.serve.cron`), e.g. nightly re-evaluation.

Run:  python -m flows.serve [--params params.yaml]
Keeps a process running that starts `pipeline` at each scheduled time (Prefect `serve`); stop it with Ctrl-C.
Needs PREFECT_API_URL pointing at a Prefect server (`prefect server start`): its scheduler service creates the
scheduled runs, and its UI shows them. A temporary server has no scheduler, so nothing would ever run.
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
        # the path, not its contents: each scheduled run reads the params file as it is then
        name=params.flow.serve.name,
        cron=params.flow.serve.cron,
        parameters={"params": params_path},
    )


def main() -> None:
    from prefect.settings import PREFECT_API_URL

    args = parse_stage_args(__doc__.splitlines()[0])
    if not PREFECT_API_URL.value():
        raise SystemExit(
            "flows.serve: error: schedules need a Prefect server with its scheduler: run `prefect server start` "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    prefect.serve(scheduled_deployment(args.params))


if __name__ == "__main__":
    main()

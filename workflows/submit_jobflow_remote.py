"""Submit a campaign round with jobflow-remote (the ``jf flow submit`` path, through its Python API).

    jf project generate cspml          # once: edit ~/.jfremote/cspml.yaml (workers, queue and job stores)
    python workflows/submit_jobflow_remote.py configs/campaign_chgnet.yaml --project cspml --worker cluster
    jf runner start                    # the daemon checks jobs out, submits them to the queue, fetches outputs

jobflow-remote runs jobs in parallel on its workers (``run_locally`` runs them one after another). The jobs are
the stage Makers' ``make`` methods in ``cspml_flows.flows``, so ``cspml-flows`` must be installed on the workers.
Outputs go to the project's job store; relaxation results and promoted templates go to the campaign's results
and template stores (``stores:`` in the YAML), which workers must reach: MongoDB URIs on clusters.
"""

from __future__ import annotations

import argparse

from jobflow_remote import submit_flow

from cspml_flows.campaign import check_inputs, load_campaign, round_flow


def build_flow(config: str, round_number: int = 1):
    """The jobflow Flow of one campaign round (checked: store and model exist)."""
    cfg = load_campaign(config)
    check_inputs(cfg)
    return round_flow(cfg, round_number)


def submit(config: str, project: str | None = None, worker: str | None = None, round_number: int = 1) -> list[str]:
    """Add one round to a jobflow-remote project's queue; returns the job ids (``jf job list``)."""
    return submit_flow(build_flow(config, round_number), worker=worker, project=project)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--project", help="jobflow-remote project (default: the current one)")
    parser.add_argument("--worker", help="worker name from the project file (default: the first)")
    parser.add_argument("--round", type=int, default=1)
    args = parser.parse_args()
    ids = submit(args.config, args.project, args.worker, args.round)
    print(f"submitted {len(ids)} jobs; follow them with 'jf job list' and start 'jf runner start'")


if __name__ == "__main__":
    main()

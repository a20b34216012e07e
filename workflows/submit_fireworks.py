"""Submit a campaign round to a FireWorks LaunchPad (the same Flow that ``cspml campaign run`` executes).

    python workflows/submit_fireworks.py configs/campaign_vasp_mongodb.yaml --launchpad my_launchpad.yaml --round 1
    rlaunch -l my_launchpad.yaml rapidfire        # on the cluster, in a job script (or qlaunch)

The workflow's jobs write their outputs to the campaign's job store (``stores.jobs``: use a MongoDB URI when
workers run on other machines). Run rounds one after another: round k+1 retrieves from the template store that
round k's promotion step updated.
"""

from __future__ import annotations

import argparse

from fireworks import LaunchPad
from jobflow.managers.fireworks import flow_to_workflow

from cspml_flows.campaign import check_inputs, load_campaign, round_flow
from cspml_flows.flows.stores import job_store


def build_workflow(config: str, round_number: int = 1):
    """The FireWorks Workflow of one campaign round."""
    cfg = load_campaign(config)
    check_inputs(cfg)
    flow = round_flow(cfg, round_number)
    return flow, flow_to_workflow(flow, store=job_store(cfg.jobs_store()), name=f"{cfg.name} round {round_number}")


def submit(config: str, launchpad: LaunchPad, round_number: int = 1) -> dict[int, int]:
    """Add one round to ``launchpad``; returns the old-to-new Firework id mapping."""
    _, wf = build_workflow(config, round_number)
    return launchpad.add_wf(wf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--launchpad", help="LaunchPad YAML (default: FireWorks' own lookup)")
    parser.add_argument("--round", type=int, default=1)
    args = parser.parse_args()
    lp = LaunchPad.from_file(args.launchpad) if args.launchpad else LaunchPad.auto_load()
    ids = submit(args.config, lp, args.round)
    print(f"added {len(ids)} fireworks to {lp.host}/{lp.name}")


if __name__ == "__main__":
    main()

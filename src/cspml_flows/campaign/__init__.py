"""Campaigns: a YAML file (:mod:`.config`) run as rounds of one CSPMaker flow (:mod:`.runner`).

Round k+1 retrieves from the template store that round k updated; state lives in maggma stores, so a
re-run or a restart after a kill recomputes nothing finished.
"""

from cspml_flows.campaign.config import (
    MAX_CANDIDATES,
    MAX_COMPOSITIONS,
    MAX_NAME,
    MAX_SYSTEM_ELEMENTS,
    CampaignConfig,
    CampaignError,
    CompositionSpace,
    StoresConfig,
    check_name,
    load_campaign,
    parse_campaign,
    with_rounds,
)
from cspml_flows.campaign.maker import make_maker
from cspml_flows.campaign.runner import check_inputs, promote, round_flow, run_campaign
from cspml_flows.campaign.summary import finished_rounds, summarize_round
from cspml_flows.campaign.workdir import campaign_lock

__all__ = [
    "MAX_CANDIDATES",
    "MAX_COMPOSITIONS",
    "MAX_NAME",
    "MAX_SYSTEM_ELEMENTS",
    "CampaignConfig",
    "CampaignError",
    "CompositionSpace",
    "StoresConfig",
    "campaign_lock",
    "check_inputs",
    "check_name",
    "finished_rounds",
    "load_campaign",
    "make_maker",
    "parse_campaign",
    "promote",
    "round_flow",
    "run_campaign",
    "summarize_round",
    "with_rounds",
]

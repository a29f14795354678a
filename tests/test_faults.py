"""Fault scenarios (tier 3): a seeded randomized campaign of kill -9, SIGSTOP and SIGTERM at random
moments against a real multi-process swarm with spare peers; every output equals the local reference.
"""

from __future__ import annotations

import pytest
from conftest import FAMILIES
from faults import run_campaign

pytestmark = pytest.mark.slow

TRIALS_PER_FAMILY = 6  # 5 families -> 30 trials


@pytest.mark.timeout(1800)  # 30 trials with peer restarts: several minutes on 2 cores
def test_fault_campaign_every_output_equals_reference(tiny_model_path):
    paths = {family: tiny_model_path(family) for family in FAMILIES}
    campaign = run_campaign(paths, TRIALS_PER_FAMILY, seed=20261125)
    assert len(campaign.trials) == TRIALS_PER_FAMILY * len(FAMILIES)
    assert {t.fault for t in campaign.trials} == {"kill", "stop", "term"}
    assert sum(t.recoveries > 0 for t in campaign.trials) >= len(campaign.trials) // 2, "faults should hit routes"
    assert not campaign.failures, "\n".join(
        f"{t.family} {t.fault} at {t.moment} on {t.target_span}: {t.error or 'output differs'}"
        for t in campaign.failures
    )

"""The per-tenant limit (serving.max_in_flight_per_tenant) is checked in one module,
serving/scheduling/tenant_queues.py: per request at admission, and for a whole GenerateBatch."""
from __future__ import annotations

import pytest

from promptmux.serving.config import ServingConfig
from promptmux.prompts.errors import InvalidRequestError, ResourceExhaustedError
from promptmux.serving.scheduling.tenant_queues import refuse_batch_over_tenant_limit, refuse_if_over_limits


def test_a_batch_up_to_the_limit_passes_and_one_more_is_invalid():
    config = ServingConfig(max_in_flight_per_tenant=12)
    refuse_batch_over_tenant_limit(config, 12)
    with pytest.raises(InvalidRequestError, match=r"GenerateBatch got 13 requests.*max_in_flight_per_tenant=12.*at most 12"):
        refuse_batch_over_tenant_limit(config, 13)


def test_a_request_past_the_tenants_in_flight_count_is_resource_exhausted():
    config = ServingConfig(max_in_flight_per_tenant=2)
    refuse_if_over_limits(config, closing=False, queued=0, in_flight=1, tenant="acme")
    with pytest.raises(ResourceExhaustedError, match="tenant 'acme' has 2 requests in flight"):
        refuse_if_over_limits(config, closing=False, queued=0, in_flight=2, tenant="acme")

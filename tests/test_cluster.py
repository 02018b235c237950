"""The local Ray that a job starts when RAY_ADDRESS is unset."""

import logging
import os

import pytest

from semvec import cluster
from semvec.cluster import _PG_CLEANER_LOGGER, init_ray


def test_local_workers_ask_this_cluster_and_never_another_dashboard(ray_local):
    ray = ray_local

    @ray.remote
    def probe():
        from ray.dashboard.utils import get_address_for_submission_client

        return (os.environ.get("RAY_ADDRESS"), get_address_for_submission_client(None),
                logging.getLogger(_PG_CLEANER_LOGGER).getEffectiveLevel())

    from ray.dashboard.utils import get_address_for_submission_client

    gcs = ray.get_runtime_context().gcs_address
    ours = get_address_for_submission_client(gcs)
    address, api_server, cleaner_level = ray.get(probe.remote())
    # A State API query from any worker (Ray Train's PlacementGroupCleaner among them) reaches this
    # cluster, whatever else runs on the machine, and not the default port another Ray may serve.
    assert address == gcs
    assert api_server == ours and not ours.endswith(":8265"), (api_server, ours)
    assert cleaner_level == logging.ERROR


@pytest.mark.parametrize("given, expected", [(None, "0"), ("0", "0"), ("1", "1")])
def test_ray_usage_stats_are_off_unless_the_user_turns_them_on(monkeypatch, given, expected):
    import ray

    from semvec import cluster

    seen = []
    monkeypatch.setattr(cluster, "_started_here", set())  # the Rays "started" here are forgotten after
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    class Started:  # what ray.init returns: the address of the Ray it started
        address_info = {"gcs_address": "127.0.0.1:1"}

    monkeypatch.setattr(ray, "init", lambda *a, **k: seen.append(os.environ.get("RAY_USAGE_STATS_ENABLED"))
                        or Started)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", given or "-")  # recorded, so restored afterwards
    if given is None:
        monkeypatch.delenv("RAY_USAGE_STATS_ENABLED")
    init_ray()
    assert seen == [expected]


def test_the_notice_that_suggests_turning_token_auth_off_is_dropped_and_nothing_else():
    cluster._quiet_auth_notice()
    cluster._quiet_auth_notice()  # once, however often Ray is started
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert sum(isinstance(f, cluster._AuthNoticeFilter) for f in notice.filters) == 1

    def shown(msg: str) -> bool:
        return notice.filter(logging.LogRecord(notice.name, logging.WARNING, __file__, 1, msg, None, None))

    assert not shown("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
    assert shown("Token authentication is disabled for this Ray cluster. Anyone with network access")

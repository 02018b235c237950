"""The local Ray that a job starts when RAY_ADDRESS is unset."""

import logging
import os

from semvec.cluster import _PG_CLEANER_LOGGER


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

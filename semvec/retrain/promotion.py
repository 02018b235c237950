"""Retraining's registry policy: a challenger is registered whatever the decision, tagged with the
decision and every score; promotion moves @previous to the old champion and @champion to the
challenger; rollback moves them back. MLflow itself is reached through semvec.tracking only."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from semvec import storage, tracking
from semvec.errors import ConfigError

CHAMPION, PREVIOUS = "champion", "previous"
log = logging.getLogger("semvec.retrain")


def record_decision(name: str, run_id: str, champion: str, decision: str, reasons: list[str],
                    scores: dict, metrics: dict, primary: str) -> str:
    """Register the challenger logged by run_id; returns its version. scores: {suite: {"champion":
    x, "challenger": y}}; metrics: {suite: metric name}."""
    flat = {f"{suite}.{metrics[suite]}.{who}": value
            for suite, pair in scores.items() for who, value in pair.items()}
    tags = {"semvec.decision": decision, "semvec.champion_version": champion,
            "semvec.primary_suite": primary, "semvec.reasons": " | ".join(reasons)[:5000],
            "semvec.scores": json.dumps(scores)[:5000]}
    tracking.log_result(run_id, flat, tags)
    version = tracking.register_run_model(name, run_id, tags)  # once, though this may run again
    if decision == "promoted":
        now = tracking.alias_version(name, CHAMPION)
        if now not in (champion, version):  # moved since this round read it (by hand, a rollback)
            log.warning("semvec retrain: @%s of %r is v%s, not v%s as when this round began: v%s is "
                        "registered but not promoted", CHAMPION, name, now, champion, version)
            return version
        if now == champion:  # a rerun after @champion moved leaves @previous as it is
            tracking.set_alias(name, PREVIOUS, champion)
        tracking.set_alias(name, CHAMPION, version)
    return version


def rollback(name: str, then: Callable[[str], None] | None = None) -> str:
    """@champion = @previous (which is then cleared); returns the restored version. `then(version)`
    runs before @previous is cleared. Each step may be redone: a rerun after a crash between
    them finishes the rollback rather than rolling back again or tagging the restored version."""
    if not tracking.registered(name):
        raise ConfigError(f"model {name!r} is not registered in the registry at "
                          f"{storage.display(tracking.tracking_uri())}: nothing to roll back")
    previous, current = tracking.alias_version(name, PREVIOUS), tracking.alias_version(name, CHAMPION)
    if previous is None:
        raise ConfigError(f"model {name!r} has no @{PREVIOUS} in the registry at "
                          f"{storage.display(tracking.tracking_uri())}: nothing to roll back to")
    if current != previous:  # (equal: a rollback cut short after @champion moved back)
        if current is not None:
            tracking.tag_version(name, current, "semvec.rolled_back", "true")
        tracking.set_alias(name, CHAMPION, previous)
    if then is not None:
        then(previous)
    tracking.delete_alias(name, PREVIOUS)
    return previous

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
ROLLED_BACK = "semvec.rolled_back"
log = logging.getLogger("semvec.retrain")


def record_decision(name: str, run_id: str, champion: str, decision: str, reasons: list[str],
                    scores: dict, metrics: dict, primary: str) -> tuple[str, str]:
    """Register the challenger logged by run_id; returns its version and the decision as it ended:
    "promoted" becomes "refused" when @champion is no longer the one the round scored against,
    or the version was rolled back since (a rerun after a crash). scores: {suite: {"champion":
    x, "challenger": y}}; metrics: {suite: metric name}."""
    flat = {f"{suite}.{metrics[suite]}.{who}": value
            for suite, pair in scores.items() for who, value in pair.items()}
    tags = {"semvec.decision": decision, "semvec.champion_version": champion,
            "semvec.primary_suite": primary, "semvec.reasons": " | ".join(reasons)[:5000],
            "semvec.scores": json.dumps(scores)[:5000]}
    tracking.log_result(run_id, flat, tags)
    version = tracking.register_run_model(name, run_id, tags)  # once, though this may run again
    if decision != "promoted":
        return version, decision
    now = tracking.alias_version(name, CHAMPION)
    if now not in (champion, version):
        why = f"@{CHAMPION} is v{now}, not v{champion} that this round scored against"
    elif tracking.version_tags(name, version).get(ROLLED_BACK) == "true":
        why = f"v{version} was rolled back since"
    else:
        why = None
    if why is not None:  # a rerun of a round cut short, after someone moved the aliases
        log.warning("v%s is registered but not promoted: %s", version, why)
        for key, value in (("semvec.decision", "refused"), ("semvec.not_promoted", why)):
            tracking.tag_version(name, version, key, value)
        tracking.log_result(run_id, {}, {"semvec.decision": "refused", "semvec.not_promoted": why})
        return version, "refused"
    if now == champion:  # a rerun after @champion moved leaves @previous as it is
        tracking.set_alias(name, PREVIOUS, champion)
    tracking.set_alias(name, CHAMPION, version)
    return version, decision


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
            tracking.tag_version(name, current, ROLLED_BACK, "true")
        tracking.set_alias(name, CHAMPION, previous)
    if then is not None:
        then(previous)
    tracking.delete_alias(name, PREVIOUS)
    return previous

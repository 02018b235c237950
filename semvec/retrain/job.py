"""Scheduled retraining: new data -> challenger -> judged against the champion -> promoted or not.

    check (config, data, champion; before any lock or Ray) -> lock -> what is new?
    -> fine-tune from models:/NAME@champion with replay / L2-SP / EWC / distillation
    -> score champion and challenger on every suite -> decide -> record in MLflow
    -> on promotion: @previous = old champion, @champion = challenger, backfill into
       OUTPUT_ROOT/v<version>/, and only when that backfill is complete, CURRENT -> it

State under `state`: lock.json, state.json (snapshots trained on, by content hash),
replay/ (every snapshot trained on, the past data later runs replay), challengers/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from semvec import crashpoints, models, storage, tracking
from semvec.datasets import load_examples
from semvec.errors import ConfigError, OutputMismatch
from semvec.retrain import promotion
from semvec.retrain.config import TASK_KINDS, RetrainConfig, Suite, SuiteKind
from semvec.retrain.lock import Lock

log = logging.getLogger("semvec.retrain")

STATE = "state.json"
PENDING = "pending"  # in state.json: a round decided, not yet wholly recorded
CURRENT = "CURRENT"


def retrain(cfg: RetrainConfig) -> dict:
    """One retraining round; returns a summary with the decision and every metric."""
    crashpoints.arm()
    snapshots = [f for uri in cfg.snapshots for f in storage.list_inputs(uri, "snapshots")]
    _check(cfg)
    tracking.require_alias(cfg.name, "champion")  # a champion exists: checked before the lock is taken
    with Lock(cfg.state, cfg.lock_timeout_s) as lock:
        # read again under the lock: a run that just finished may have promoted a new one
        summary = _locked(cfg, tracking.require_alias(cfg.name, "champion"), snapshots, lock)
        if lock.took_stale:  # its holder died: say whose lock was taken over
            summary["took_stale_lock"] = lock.took_stale
    return summary


def _locked(cfg: RetrainConfig, champion: str, snapshots: list, lock: Lock) -> dict:
    state = _read_state(cfg.state)
    if state.get(PENDING):  # a round cut short after its decision: its record is finished first
        if not tracking.run_alive(state[PENDING]["run_id"]):
            raise ConfigError(
                f"{storage.display(storage.join(cfg.state, STATE))} holds a round decided in MLflow run "
                f"{state[PENDING]['run_id']}, which {storage.display(tracking.tracking_uri())} no longer "
                f"has (deleted?); remove its \"{PENDING}\" entry there to train those snapshots again")
        log.warning("the round of run %s was cut short after its decision; recording "
                    "it now (new snapshots, if any, wait for the next round)", state[PENDING]["run_id"])
        return _record(cfg, state, lock)
    new = [(f, _content_hash(f.uri)) for f in snapshots]
    seen = [(f, h) for f, h in new if h in state["trained"]]
    new = [(f, h) for f, h in new if h not in state["trained"]]
    if not new:
        runs = sorted({state["trained"][h]["run_id"] for _, h in seen})
        summary = {"decision": "nothing-new", "message": f"every snapshot was already trained on "
                   f"(run {', '.join(runs)}); nothing to train", "champion_version": champion}
        _remove_challengers(cfg)  # a round cut short after its record left them (none is pending)
        _serve(cfg, champion, lock, summary)
        return summary
    for f, _ in new:  # a bad row is named in its own file, before a copy or a run is made of it
        load_examples(cfg.task, f.uri, skip_blank=True)
    # copied to the replay store first, and trained from the copies: what is trained on, replayed
    # later and hashed is one read of each file. Later rounds replay a copy once state.json lists
    # its snapshot as trained (a round cut short before its decision trains again on it as new).
    # a copy cut short before its rename left its temporary
    storage.remove_temporaries(storage.filesystem(cfg.replay_store), storage.strip(cfg.replay_store),
                               _is_replay_copy)
    kept = [(f, h, _keep_for_replay(cfg, f, h)) for f, h in new]
    state[PENDING] = _round(cfg, champion, kept)
    # written ahead: from here a rerun records this decision, and neither trains nor scores again
    lock.check()  # a round that lost its lock (its renewals failed for the timeout) stops here
    storage.put_atomic(storage.join(cfg.state, STATE), json.dumps(state, indent=2).encode(),
                       what="retrain: decision")
    return _record(cfg, state, lock)


def _record(cfg: RetrainConfig, state: dict, lock: Lock) -> dict:
    """The decided round into the registry (its version, and @previous/@champion on promotion),
    then into state.json (its snapshots trained on: replayed from now on), then the backfill. Each
    step may be redone: a rerun after a crash anywhere in here finishes it, with no second version."""
    round_ = state[PENDING]
    lock.check()
    version, decision = promotion.record_decision(
        cfg.name, round_["run_id"], round_["champion_version"], round_["decision"], round_["reasons"],
        round_["scores"], round_["metrics"], round_["primary"])
    summary = {k: round_[k] for k in ("reasons", "scores", "run_id", "champion_version")}
    summary.update(decision=decision, challenger_version=version, snapshots=list(round_["snapshots"]))
    print(f"semvec retrain: challenger v{version} {decision} against champion "
          f"v{round_['champion_version']}: " + "; ".join(round_["reasons"]), flush=True)
    for uri, h in round_["snapshots"].items():  # trained on, whatever the decision: not tried twice
        state["trained"][h] = {"uri": uri, "run_id": round_["run_id"], "version": version,
                               "decision": decision, "at": round_["at"]}
    del state[PENDING]
    lock.check()
    storage.put_atomic(storage.join(cfg.state, STATE), json.dumps(state, indent=2).encode(),
                       what="retrain: recorded")
    _remove_challengers(cfg)  # the challenger lives in MLflow now; its folder and checkpoints go
    if cfg.backfill is not None:
        promoted = decision == "promoted"
        _serve(cfg, version if promoted else tracking.require_alias(cfg.name, "champion"), lock, summary,
               always=promoted)
    return summary


def _serve(cfg: RetrainConfig, champion: str, lock: Lock, summary: dict, always: bool = False) -> None:
    """The champion's vectors embedded and CURRENT on them (a promotion's, `always`; otherwise only
    when CURRENT is behind it: an earlier promotion's backfill failed or was cut short, or a
    rollback found none). A backfill begun before resumes."""
    if cfg.backfill is not None and (always or not _current_is(cfg, champion)):
        lock.check()
        summary["backfill"] = publish_backfill(cfg, champion)


def _check(cfg: RetrainConfig) -> None:
    """Everything that can be wrong before the lock is taken and Ray starts."""
    for suite in cfg.suites:
        for field, uri in suite.named_files():
            storage.list_inputs(uri, f"suite {suite.name!r} {field}")  # exists and holds data
        if suite.kind != SuiteKind.RETRIEVAL:  # parsed now, as the scoring will, not after training
            load_examples(suite.kind.value, suite.data)
        if suite.kind == SuiteKind.RETRIEVAL:  # read it whole now, not after training
            from semvec.datasets import read_beir

            read_beir(suite.corpus, suite.queries, suite.qrels)
    for uri in cfg.replay:  # read only on a night with new data: checked every night
        storage.list_inputs(uri, "replay")
    if cfg.dev:
        storage.list_inputs(cfg.dev, "dev")
    if (cfg.ewc or cfg.distill) and not cfg.replay and not _replay_store(cfg):
        raise ConfigError("ewc and distill need past data and the replay store holds none (no round "
                          "trained yet, or only on data of versions rolled back since): set replay to "
                          "the champion's training data, or ewc: 0 and distill: 0")
    if cfg.backfill is not None:
        storage.list_inputs(cfg.backfill.input, "backfill input")
        storage.check_writable(cfg.backfill.output_root)
    storage.check_writable(cfg.state)


def _round(cfg: RetrainConfig, champion: str, new: list) -> dict:
    """Train a challenger on the new snapshots ((file, hash, replay copy) each), score it against
    the champion and decide; returns the decision as state.json's pending round holds it."""
    from semvec.train.job import fit

    champion_dir = models.resolve_model(f"models:/{cfg.name}/{champion}")
    _check_continuable(champion_dir, f"models:/{cfg.name}/{champion}", cfg.suites)
    key = hashlib.sha1("".join(h for _, h, _ in new).encode()).hexdigest()[:12]
    with tempfile.TemporaryDirectory() as tmp:
        train = _merge(cfg, [copy for _, _, copy in new], Path(tmp) / "new.jsonl")
        past = [f.uri for f in _replay_store(cfg)]
        past += [f.uri for uri in cfg.replay for f in storage.list_inputs(uri, "replay")]
        replay = _merge(cfg, past, Path(tmp) / "replay.jsonl") if past else None
        _clear_challengers(cfg, keep=key)  # what a round cut short before its record left
        tc = cfg.train_config(train=str(train), replay=str(replay) if replay else None,
                              model=str(champion_dir), name=f"retrain-{cfg.name}-{key}",
                              output=storage.join(cfg.challengers, key))
        trained = fit(tc, experiment=cfg.experiment, restart_changed=True)
    scores = _score(cfg, f"models:/{cfg.name}/{champion}", tc.output)
    decision, reasons = decide(cfg, scores)
    return {"decision": decision, "reasons": reasons, "scores": scores, "run_id": trained["run_id"],
            "champion_version": champion, "metrics": {s.name: s.metric for s in cfg.suites},
            "primary": cfg.primary, "at": time.time(),
            "snapshots": {storage.display(f.uri): h for f, h, _ in new}}


def _remove_challengers(cfg: RetrainConfig) -> None:
    """Every challenger's folder and checkpoints, once no round is pending: scratch space, so a
    failure is a warning (the next round tries again)."""
    try:
        _clear_challengers(cfg)
    except Exception as exc:  # noqa: BLE001 - the round is recorded; its backfill is due
        log.warning("the challengers under %s were not all removed (%s); the next round removes them",
                    storage.display(cfg.state), type(exc).__name__)


def _clear_challengers(cfg: RetrainConfig, keep: str | None = None) -> None:
    """Remove the challengers' folders and checkpoints under the state prefix (a model and its
    checkpoints per round: hundreds of MB each), all but `keep`'s, which a round resumes."""
    root = cfg.challengers
    fs, path = storage.filesystem(root), storage.strip(root)
    if not fs.exists(path):
        return
    for entry in fs.ls(path, detail=False):
        name = storage.basename(entry)
        if entry.rstrip("/") != path and (keep is None or name not in (keep, f"{keep}-checkpoints")):
            fs.rm(entry, recursive=True)  # (not a folder marker object naming the folder itself)


def _check_continuable(model_dir: Path, ref: str, suites: list = ()) -> None:
    """Before training: it starts from the champion's HF weights (extras kept beside them would be
    lost), and a classification or NER suite scores the champion's head, which it must have."""
    card = models.read_card(model_dir)
    if card is not None and card.method_name in ("adapter", "prompt"):
        raise ConfigError(f"champion {ref} was tuned with {card.method_name}, whose weights live beside "
                          "the model; retraining continues full, lora or bitfit champions only")
    for suite in suites:
        if suite.kind in TASK_KINDS and (card is None or card.task != suite.kind.value):
            has = f"a {card.task} model" if card is not None and card.task else "no task model (no head)"
            raise ConfigError(f"suite {suite.name!r} ({suite.kind.value}) scores the champion's "
                              f"{suite.kind.value} head, but champion {ref} is {has}; register a "
                              f"{suite.kind.value} model trained by semvec as champion first")


def decide(cfg: RetrainConfig, scores: dict) -> tuple[str, list[str]]:
    """Promote only when the primary suite improves by >= margin and no guard drops > tolerance."""
    reasons, ok = [], True
    for suite in cfg.suites:
        old, new = scores[suite.name]["champion"], scores[suite.name]["challenger"]
        delta = new - old
        if suite.name == cfg.primary:
            passed = delta >= cfg.margin
            rule = f"needs >= +{cfg.margin}"
        else:
            passed = delta >= -cfg.tolerance
            rule = f"may drop <= {cfg.tolerance}"
        ok &= passed
        reasons.append(f"{suite.name} {suite.metric} {old:.4f} -> {new:.4f} ({delta:+.4f}, {rule}: "
                       f"{'ok' if passed else 'fails'})")
    return ("promoted" if ok else "refused"), reasons


def _score(cfg: RetrainConfig, champion: str, challenger: str) -> dict:
    """{suite: {"champion": x, "challenger": y}}, every score a Ray task on the workers: a
    cluster's head has no CPU to spare (cluster.yaml gives it none) and the GPUs are there. The
    models are passed as references that any node resolves (registry, s3:// or a local path)."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0,
                      max_retries=2)(_evaluate_on_worker)
    uri = tracking.tracking_uri()
    if not storage.is_remote(challenger):  # a path the workers resolve wherever they run from
        challenger = str(Path(challenger).resolve())
    refs = {s.name: {"champion": task.remote(s, champion, uri), "challenger": task.remote(s, challenger, uri)}
            for s in cfg.suites}
    try:
        return {name: {who: float(ray.get(ref)) for who, ref in pair.items()} for name, pair in refs.items()}
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ConfigError):  # the task's own one-line error, not Ray's wrapping
            raise exc.cause from None
        raise


def _evaluate_on_worker(suite: Suite, model: str, tracking_uri: str) -> float:
    # the driver's registry, whatever this worker's working directory or environment says
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    return evaluate_suite(suite, model)


def evaluate_suite(suite: Suite, model: str) -> float:
    """The suite's metric for a model directory, as `semvec evaluate` computes it."""
    from semvec import evaluate

    result = evaluate.evaluate(suite.kind, model=model, data=suite.data, corpus=suite.corpus,
                               queries=suite.queries, qrels=suite.qrels)
    return float(result[suite.metric])


def publish_backfill(cfg: RetrainConfig, version: str) -> dict:
    """Embed the corpus with the new champion into OUTPUT_ROOT/v<version>/; CURRENT moves after."""
    from semvec.backfill.job import run

    root = cfg.backfill.output_root
    output = storage.join(root, f"v{version}")
    model = f"models:/{cfg.name}/{version}"
    try:  # an earlier round's backfill of this version that did not finish: resume it
        summary = run(cfg.backfill_config(model, output))
    except OutputMismatch as exc:  # other backfill settings, or files gone from the corpus since:
        # this version's own output, so it is embedded again
        log.warning("%s cannot be resumed (%s); embedding it again", storage.display(output), exc)
        summary = run(cfg.backfill_config(model, output, overwrite=True))
    if summary["embedded"] + summary["quarantined"] != summary["rows"] or not summary["embedded"]:
        raise RuntimeError(f"backfill into {storage.display(output)} embedded {summary['embedded']} of "
                           f"{summary['rows']} rows; CURRENT stays where it was")
    point_current(root, output)
    return {"output": storage.display(output), "embedded": summary["embedded"],
            "quarantined": summary["quarantined"]}


def _current_is(cfg: RetrainConfig, version: str) -> bool:
    root = cfg.backfill.output_root
    fs, path = storage.filesystem(root), storage.strip(storage.join(root, CURRENT))
    if not fs.exists(path):
        return False
    return fs.cat_file(path).decode().strip() == storage.join(root, f"v{version}").rstrip("/")


def point_current(root: str, output: str) -> None:
    storage.put_atomic(storage.join(root, CURRENT), (output.rstrip("/") + "\n").encode(),
                       what="retrain: CURRENT")


def rollback(name: str, backfill_root: str | None = None) -> dict:
    """@champion goes back to @previous; CURRENT follows when that version's backfill is complete."""
    result = {"name": name, "champion_version": None, "current": None}

    def follow(version: str) -> None:  # before @previous is cleared: a rerun after a crash redoes it
        result["champion_version"] = version
        if not backfill_root:
            return
        output = storage.join(backfill_root, f"v{version}")
        fs = storage.filesystem(output)
        manifest = storage.strip(storage.join(output, "_manifest.json"))
        if fs.exists(manifest) and json.loads(fs.cat_file(manifest)).get("status") == "complete":
            point_current(backfill_root, output)
            result["current"] = storage.display(output)

    crashpoints.arm()
    promotion.rollback(name, then=follow)
    return result


def _read_state(state: str) -> dict:
    fs, path = storage.filesystem(state), storage.strip(storage.join(state, STATE))
    if not fs.exists(path):
        return {"trained": {}}
    return json.loads(fs.cat_file(path))


def _replay_store(cfg: RetrainConfig) -> list:
    """The copies of the snapshots state.json lists as trained on; a copy made by a round cut short
    before its decision was written is not one of them (that round trains again, on it as new), nor
    is the data of a version promoted and then rolled back (`semvec rollback`: a person undid what
    it taught, so it is not taught again)."""
    store = cfg.replay_store
    fs = storage.filesystem(store)
    if not fs.exists(storage.strip(store)):
        return []
    try:
        held = storage.list_inputs(store)
    except ConfigError:  # an empty folder
        return []
    trained = _read_state(cfg.state)["trained"]
    promoted = {str(t.get("version")) for t in trained.values() if t.get("decision") == "promoted"}
    undone = set()
    if promoted:  # one registry search, whatever the number of rounds
        undone = promoted & tracking.versions_tagged(cfg.name, promotion.ROLLED_BACK, "true")
    if undone:
        log.info("not replayed: the snapshots of v%s, rolled back", ", v".join(sorted(undone)))
    kept = {h[:16] for h, t in trained.items() if str(t.get("version")) not in undone}
    return [f for f in held if _is_replay_copy(Path(f.relative).name)
            and Path(f.relative).name.split("-", 1)[0] in kept]


def _content_hash(uri: str) -> str:
    digest = hashlib.sha256()
    with storage.filesystem(uri).open(storage.strip(uri), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _replay_name(digest: str, relative: str) -> str:
    return f"{digest[:16]}-{Path(relative).name}"


def _is_replay_copy(name: str) -> bool:
    """A copy _keep_for_replay made (not the temporary of one, nor anyone else's file)."""
    return re.fullmatch(r"[0-9a-f]{16}-.+", name) is not None and not storage.TEMPORARY.fullmatch(name)


def _keep_for_replay(cfg: RetrainConfig, snapshot, digest: str) -> str:
    """The snapshot's bytes, as hashed, into the replay store; returns the copy's URI."""
    data = storage.filesystem(snapshot.uri).cat_file(storage.strip(snapshot.uri))
    if hashlib.sha256(data).hexdigest() != digest:
        raise ConfigError(f"snapshot {storage.display(snapshot.uri)!r} changed while this round read it; "
                          "rerun once it is written whole")
    copy = storage.join(cfg.replay_store, _replay_name(digest, snapshot.relative))
    storage.put_atomic(copy, data, what="retrain: replay copy")
    return copy


def _merge(cfg: RetrainConfig, uris: list[str], out: Path) -> Path:
    """Examples from many files (any layout the task reads) -> one jsonl that training reads."""
    with open(out, "w") as f:
        for uri in uris:
            for example in load_examples(cfg.task, uri, skip_blank=True):  # counted in a warning
                f.write(json.dumps({k: v for k, v in example.items() if v is not None}) + "\n")
    return out

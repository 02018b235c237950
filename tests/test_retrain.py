"""Scheduled retraining end to end: a real MLflow server, state and vectors on the S3 server.

One registered model lives through a sequence of rounds: a better challenger is promoted (and the
corpus re-embedded, CURRENT flipped after), the same snapshot again does nothing, a worse
challenger is refused, a concurrent run is refused, a stale lock is taken over, and a rollback
restores the previous champion, whose missing vectors the next round then writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import yaml
from mlflow.tracking import MlflowClient

from semvec import models, tracking
from semvec.datasets import Task
from semvec.errors import ConfigError
from semvec.retrain.config import load_retrain_config
from semvec.retrain.job import _replay_store, publish_backfill, rollback
from semvec.retrain.job import retrain as run_round
from tests.conftest import cli, crash_after, write_jsonl
from tests.test_train import make_task_data

pytestmark = pytest.mark.slow


def semvec_retrain(settings: dict, tmp_path: Path, crash_at: str | None = None,
                   torn: bool = False) -> tuple[int, dict, str]:
    """`semvec retrain --config` in a fresh process, as a scheduler runs it; killed right after its
    first write described by `crash_at`, when given (`torn`: before that write's rename)."""
    config = tmp_path / f"retrain-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump(settings))
    return semvec_command(["retrain", "--config", str(config)], tmp_path, crash_at, torn)


def semvec_command(args: list[str], cwd: Path, crash_at: str | None = None,
                   torn: bool = False) -> tuple[int, dict, str]:
    env = dict(os.environ, **(crash_after(crash_at) if crash_at else {}),
               **({"SEMVEC_CRASH_TORN": "1"} if torn else {}))
    result = subprocess.run([sys.executable, "-m", "semvec.cli", *args, "--json"], capture_output=True,
                            text=True, cwd=cwd, timeout=600, env=env, start_new_session=True)
    # with --json, stdout holds the summary line alone (Ray's forwarded lines go to stderr)
    return result.returncode, (json.loads(result.stdout) if result.returncode == 0 else {}), result.stderr


@pytest.fixture
def world(tiny_models, tmp_path, monkeypatch, mlflow_server, s3_env):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    monkeypatch.setenv("SEMVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    prefix = f"s3://{s3_env['bucket']}/{name}"
    assert models.register_model(str(tiny_models["bert"]), name, "champion") == "1"
    train, dev = make_task_data(Task.STS, tmp_path / "data", n_train=320)
    past, _ = make_task_data(Task.STS, tmp_path / "past", n_train=64)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in ("a red cat", "blue dog", "x")])
    fs = fsspec.filesystem("s3")
    fs.put(str(train), f"{prefix}/incoming/batch1.jsonl")
    cfg = {"name": name, "task": "sts", "snapshots": [f"{prefix}/incoming/"], "state": f"{prefix}/state",
           "suites": [{"name": "dev", "kind": "sts", "data": str(dev)},
                      {"name": "past", "kind": "sts", "data": str(past)}],
           "replay": [str(past)], "distill": 0.2, "tolerance": 0.5,
           "train": {"epochs": 2, "workers": 1, "lr": 1e-3, "patience": 2},
           "backfill": {"input": str(corpus), "output_root": f"{prefix}/vectors"}}
    return {"name": name, "prefix": prefix, "cfg": cfg, "fs": fs, "train": train,
            "client": MlflowClient(mlflow_server["uri"])}


def test_retraining_rounds_promote_skip_refuse_lock_and_roll_back(ray_local, world, capsys):
    name, prefix, fs, client = world["name"], world["prefix"], world["fs"], world["client"]
    tmp = world["train"].parents[1]

    def retrain(settings: dict = world["cfg"]) -> dict:
        """`semvec retrain --config --json` as a scheduler runs it, in this process on the tests'
        Ray: its exit code, and stdout that holds the summary line alone."""
        config = tmp / f"retrain-{uuid.uuid4().hex[:6]}.yaml"
        config.write_text(yaml.safe_dump(settings))
        code, out, err = cli(capsys, "retrain", "--config", str(config), "--json")
        assert code == 0, err[-3000:]
        return json.loads(out)

    def retrain_here(settings: dict = world["cfg"]) -> dict:
        """A round in this process, on the tests' Ray (its workers hold the S3 server's login)."""
        config = tmp / f"retrain-{uuid.uuid4().hex[:6]}.yaml"
        config.write_text(yaml.safe_dump(settings))
        return run_round(load_retrain_config(config))

    # 1. a challenger that learned the task beats the untrained champion: promoted, re-embedded.
    #    The round is killed right after it copies its snapshot to the replay store (before
    #    training: the copy is what it trains on), then right after its training is recorded as
    #    finished (nothing decided yet: the rerun trains and scores again, in the same MLflow run,
    #    and does not replay its own copy), then right after it writes its decision ahead, then
    #    each rerun one write further into its record: the version registered, @previous,
    #    @champion, state.json (the round recorded, its backfill not begun); each finishes what the
    #    one before began and trains nothing. The last runs through the command in this process
    #    (its exit code and its JSON line): nothing new to train, it embeds the corpus with the
    #    champion it promoted, and CURRENT follows.
    before_decision = ("retrain: replay copy", "train: run finished")
    for write in (*before_decision, "retrain: decision", "registered", "@previous", "@champion",
                  "retrain: recorded"):
        code, _, err = semvec_retrain(world["cfg"], tmp, crash_at=write)
        assert code == -9, f"no crash after {write!r}: {err[-3000:]}"
        if write in before_decision:
            assert not fs.exists(f"{prefix}/state/state.json"), write
            continue
        state = json.loads(fs.cat_file(f"{prefix}/state/state.json"))
        assert ("was cut short after its decision" in err) == (write != "retrain: decision"), err[-3000:]
        if write == "retrain: recorded":
            assert "pending" not in state and [t["decision"] for t in state["trained"].values()] == [
                "promoted"]
            assert not fs.exists(f"{prefix}/vectors/CURRENT")
        else:
            assert state["pending"]["decision"] == "promoted" and not state["trained"], write
    first = retrain()
    assert first["decision"] == "nothing-new" and first["backfill"]["embedded"] == 3, first
    (promoted,) = json.loads(fs.cat_file(f"{prefix}/state/state.json"))["trained"].values()
    run_id = promoted["run_id"]
    assert promoted["version"] == "2" and run_id in first["message"]
    assert tracking.alias_version(name, "champion") == "2" == first["champion_version"]
    assert tracking.alias_version(name, "previous") == "1"
    # once: one version of the challenger, one run of it, one copy of its snapshot to replay
    assert sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'")) == [1, 2]
    assert [r.info.run_id for r in client.search_runs(
        [client.get_run(run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.runName` = '{client.get_run(run_id).info.run_name}'")] == [run_id]
    assert len(fs.ls(f"{prefix}/state/replay/", refresh=True)) == 1
    assert "pending" not in json.loads(fs.cat_file(f"{prefix}/state/state.json"))
    manifest = json.loads(fs.cat_file(f"{prefix}/vectors/v2/_manifest.json"))
    assert manifest["status"] == "complete" and manifest["model"]["reference"] == f"models:/{name}/2"
    assert fs.cat_file(f"{prefix}/vectors/CURRENT").decode().strip() == f"{prefix}/vectors/v2"
    version = client.get_model_version(name, "2")
    assert version.tags["semvec.decision"] == "promoted" and "dev" in version.tags["semvec.scores"]
    run = client.get_run(run_id)
    assert run.data.tags["semvec.decision"] == "promoted"
    assert {"dev.spearman.champion", "dev.spearman.challenger"} <= set(run.data.metrics)
    # the challenger is in MLflow: its folder and checkpoints (hundreds of MB a night) are gone
    assert not fs.exists(f"{prefix}/state/challengers") or not fs.ls(f"{prefix}/state/challengers")

    # 2. the same snapshot again: nothing to do, and it says so (CURRENT is on the champion)
    again = retrain_here()
    assert again["decision"] == "nothing-new" and run_id in again["message"] and "backfill" not in again
    assert tracking.alias_version(name, "champion") == "2"

    # 3. new data whose scores are inverted teaches the opposite: the challenger is refused, and
    #    CURRENT, on the champion, stays
    rows = [json.loads(line) for line in world["train"].read_text().splitlines()]
    worse = write_jsonl(world["train"].parent / "worse.jsonl",
                        [{**r, "score": 5.0 - r["score"]} for r in rows])
    fs.put(str(worse), f"{prefix}/incoming/batch2.jsonl")
    third = retrain_here()
    assert third["decision"] == "refused" and third["challenger_version"] == "3" and "backfill" not in third
    assert len(fs.ls(f"{prefix}/state/replay/", refresh=True)) == 2
    refused = [t for t in json.loads(fs.cat_file(f"{prefix}/state/state.json"))["trained"].values()
               if t["decision"] == "refused"]
    assert len(refused) == 1 and refused[0]["version"] == "3", refused
    assert tracking.alias_version(name, "champion") == "2"
    assert client.get_model_version(name, "3").tags["semvec.decision"] == "refused"
    assert fs.cat_file(f"{prefix}/vectors/CURRENT").decode().strip() == f"{prefix}/vectors/v2"

    # 4. a run while another holds the lock is refused before any work; a stale lock is taken
    lock = f"{prefix}/state/lock.json"
    held = {"token": "other", "host": "elsewhere", "pid": 1, "since": time.time()}
    fs.pipe(lock, json.dumps(held).encode())
    code, _, err = semvec_retrain(world["cfg"], tmp)
    assert code == 3 and "another retraining holds" in err and len(err.strip().splitlines()) == 1
    fs.pipe(lock, json.dumps({"token": "dead", "host": "elsewhere", "pid": 1, "since": 0}).encode())
    taken = retrain_here()
    assert taken["decision"] == "nothing-new" and taken["took_stale_lock"]["token"] == "dead"
    assert not fs.exists(lock)  # released

    # 5. rollback: v1 is champion again; v1 has no backfill, so CURRENT stays and says so. Killed
    #    after it tags v2 rolled back, then after @champion moves: each rerun finishes it. What v2
    #    learned from (batch1) is not replayed from then on; batch2's refused v3 still is
    replayed = [Path(f.relative).name for f in _replay_store(load_retrain_config(None, **world["cfg"]))]
    assert sorted(n.split("-", 1)[1] for n in replayed) == ["batch1.jsonl", "batch2.jsonl"]
    for write in ("semvec.rolled_back", "@champion = v1"):
        code, _, err = semvec_command(["rollback", name, "--backfill-root", f"{prefix}/vectors"], tmp,
                                      crash_at=write)
        assert code == -9, f"no crash after {write!r}: {err[-3000:]}"
        assert tracking.alias_version(name, "previous") == "1"
    restored = rollback(name, f"{prefix}/vectors")
    assert restored["champion_version"] == "1" and restored["current"] is None
    assert tracking.alias_version(name, "champion") == "1"
    assert tracking.alias_version(name, "previous") is None
    assert client.get_model_version(name, "2").tags["semvec.rolled_back"] == "true"
    assert "semvec.rolled_back" not in client.get_model_version(name, "1").tags  # the restored one
    replayed = [Path(f.relative).name for f in _replay_store(load_retrain_config(None, **world["cfg"]))]
    assert [n.split("-", 1)[1] for n in replayed] == ["batch2.jsonl"]

    # 6. the next round has nothing to train, but the champion's vectors are missing: it embeds
    #    the corpus with v1 and CURRENT follows, as after a promotion whose backfill had failed
    caught_up = retrain_here()
    assert caught_up["decision"] == "nothing-new" and caught_up["backfill"]["embedded"] == 3
    assert fs.cat_file(f"{prefix}/vectors/CURRENT").decode().strip() == f"{prefix}/vectors/v1"


def test_current_does_not_move_when_the_backfill_fails(ray_local, world, tmp_path):
    root = str(tmp_path / "vectors")
    fs = fsspec.filesystem("file", auto_mkdir=True)
    fs.pipe(f"{root}/CURRENT", f"{root}/v1\n".encode())
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": " " * i} for i in range(3)])
    for backfill, error in (
        ({"input": str(blank)}, "embedded 0 of 3 rows; CURRENT stays"),  # every row quarantined
        ({"text_field": "nope"}, "has no field 'nope'"),  # refused before any work
        ({"input": str(world["train"].parent / "gone.jsonl")}, "does not exist"),  # corpus vanished
    ):
        cfg = load_retrain_config(None, **dict(world["cfg"], backfill={
            "input": world["cfg"]["backfill"]["input"], "output_root": root, **backfill}))
        with pytest.raises((RuntimeError, ConfigError), match=error):
            publish_backfill(cfg, "1")
        assert fs.cat_file(f"{root}/CURRENT").decode().strip() == f"{root}/v1"


def test_a_local_replay_copy_cut_before_its_rename_and_a_refused_round_behind_current(ray_local, world,
                                                                                     tmp_path):
    """State on a local disk. A round killed between its replay copy's temporary and the rename left
    the temporary, named like the copy: once the rerun recorded the snapshot, every later round read
    it as replay data and failed on it. And a refused round left CURRENT behind the champion (an
    earlier promotion's backfill had failed) until a night with nothing new: it catches up now."""
    state, root = tmp_path / "state", tmp_path / "vectors"
    rows = [json.loads(line) for line in world["train"].read_text().splitlines()][:48]
    snapshot = write_jsonl(tmp_path / "incoming" / "batch.jsonl", rows)
    cfg = dict(world["cfg"], snapshots=[str(snapshot.parent)], state=str(state), margin=1.0,  # refused
               train=dict(world["cfg"]["train"], epochs=1), suites=world["cfg"]["suites"][:1], replay=[],
               distill=0.0,
               backfill={"input": world["cfg"]["backfill"]["input"], "output_root": str(root)})
    root.mkdir()
    (root / "CURRENT").write_text(f"{root / 'v0'}\n")  # behind the champion, v1
    code, _, err = semvec_retrain(cfg, tmp_path, crash_at="retrain: replay copy", torn=True)
    assert code == -9, err[-3000:]
    assert [".tmp-" in p.name for p in (state / "replay").iterdir()] == [True]
    summary = run_round(load_retrain_config(None, **cfg))
    assert summary["decision"] == "refused" and summary["backfill"]["embedded"] == 3, summary
    assert (root / "CURRENT").read_text().strip() == str(root / "v1")
    copies = [p.name for p in (state / "replay").iterdir()]  # the temporary went; the copy is replayed
    assert len(copies) == 1 and copies[0].endswith("-batch.jsonl")
    assert [Path(f.relative).name for f in _replay_store(load_retrain_config(None, **cfg))] == copies


def test_a_backfill_cut_off_by_a_crash_resumes_in_the_next_round(ray_local, world, tmp_path):
    """The versioned prefix is resumed, not rewritten: parts committed before the crash stay as
    they were. Backfill settings changed since are the one case that embeds the version again."""
    from tests.test_exactly_once import bad_and_good_corpus, start_cli

    corpus = bad_and_good_corpus(tmp_path / "big.jsonl", 60, every=4)
    root = tmp_path / "vectors"
    backfill = {"input": str(corpus), "output_root": str(root), "id_field": "id",
                "batch_rows": 10, "rows_per_file": 10}
    cfg = load_retrain_config(None, **dict(world["cfg"], backfill=backfill))
    out = root / "v1"
    # write 1 lease, 2 manifest, then per batch a quarantine part and an output part: die after 6
    crashed = start_cli(str(corpus), str(out), f"--model=models:/{world['name']}/1", "--id-field=id",
                        "--batch-rows=10", "--rows-per-file=10", env={"SEMVEC_CRASH_AT": "6"})
    _, err = crashed.communicate(timeout=300)
    assert crashed.returncode == -9, err[-1500:]
    before = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    # a job this small runs without Ray, its writes in order: after write 6, the first two batches'
    # parts are committed and four batches are to do; the resume must leave the two alone
    assert len(before) == 2 and json.loads((out / "_manifest.json").read_text())["status"] == "running"

    result = publish_backfill(cfg, "1")
    assert result["embedded"] + result["quarantined"] == 60
    assert {p: p.stat().st_mtime_ns for p in before} == before  # resumed around them
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) == result["embedded"]
    assert (root / "CURRENT").read_text().strip() == str(out)

    changed = load_retrain_config(None, **dict(world["cfg"], backfill={**backfill, "normalize": False}))
    again = publish_backfill(changed, "1")
    assert again["embedded"] == result["embedded"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"]["normalize"] is False
    assert not any(p.exists() and p.stat().st_mtime_ns == t for p, t in before.items())


def test_a_versions_prefix_left_without_its_manifest_is_embedded_again(world, tmp_path):
    """An --overwrite of a version's prefix cut short after its manifest went leaves parts and no
    manifest; the next round's catch-up embeds the version again there (it is the round's own
    prefix) rather than failing every night, and CURRENT follows."""
    root = tmp_path / "vectors"
    cfg = load_retrain_config(None, **dict(world["cfg"], backfill={
        "input": world["cfg"]["backfill"]["input"], "output_root": str(root)}))
    assert publish_backfill(cfg, "1")["embedded"] == 3
    (root / "v1" / "_manifest.json").unlink()
    (root / "CURRENT").unlink()
    assert publish_backfill(cfg, "1")["embedded"] == 3
    assert json.loads((root / "v1" / "_manifest.json").read_text())["status"] == "complete"
    assert (root / "CURRENT").read_text().strip() == str(root / "v1")


def test_a_promotion_recorded_after_the_aliases_moved_promotes_nothing(world, tiny_models):
    """A rerun records a round cut short after its decision: if @champion moved meanwhile, or the
    challenger was rolled back since, the version stays registered and is not promoted."""
    from semvec.retrain import promotion

    name, client = world["name"], world["client"]
    model = Path(tiny_models["bert"])

    def challenger(tag: str) -> str:  # a run holding a model, as a round's training leaves one
        return tracking.log_model_dir("semvec", f"challenger-{tag}", model, {"fingerprint": tag})

    def record(run_id: str) -> tuple[str, str]:
        scores = {"dev": {"champion": 0.1, "challenger": 0.5}}
        return promotion.record_decision(name, run_id, "1", "promoted", ["dev better"], scores,
                                         {"dev": "spearman"}, "dev")

    # someone else's version became champion while the round's record was cut short
    other = tracking.register_run_model(name, challenger("other"))
    tracking.set_alias(name, "champion", other)
    version, decision = record(challenger("a"))
    assert decision == "refused" and tracking.alias_version(name, "champion") == other
    assert client.get_model_version(name, version).tags["semvec.decision"] == "refused"
    assert "not v1" in client.get_model_version(name, version).tags["semvec.not_promoted"]
    # promoted, then rolled back before the round's rerun: the rerun does not promote it again
    tracking.set_alias(name, "champion", "1")
    run_b = challenger("b")
    version, decision = record(run_b)
    assert decision == "promoted" and tracking.alias_version(name, "champion") == version
    assert promotion.rollback(name) == "1"
    assert record(run_b) == (version, "refused") and tracking.alias_version(name, "champion") == "1"


def test_a_round_decided_in_a_run_deleted_since_says_what_to_do(world, tmp_path):
    """state.json holds a round decided in an MLflow run that someone deleted before the round's
    record was finished: one line naming the run and the entry to remove, before any work."""
    from semvec import storage

    run_id = tracking.log_model_dir("semvec", "deleted-challenger", Path(tmp_path), {"fingerprint": "x"})
    world["client"].delete_run(run_id)
    state = f"{world['prefix']}/state/state.json"
    world["fs"].pipe(state, json.dumps({"trained": {}, "pending": {"run_id": run_id}}).encode())
    storage.filesystem(state).invalidate_cache()
    with pytest.raises(ConfigError, match=rf"decided in MLflow run {run_id}, which .* no longer has "
                                          r"\(deleted\?\); remove its \"pending\" entry"):
        run_round(load_retrain_config(None, **world["cfg"]))
    assert json.loads(world["fs"].cat_file(state))["pending"] == {"run_id": run_id}  # left as it was


def test_a_bad_row_in_a_new_snapshot_is_named_in_its_own_file_before_any_copy(world):
    """It was named in its replay copy (state/replay/<hash>-batch1.jsonl), after the copy was made."""
    world["fs"].pipe(f"{world['prefix']}/incoming/batch1.jsonl",
                     b'{"sentence1": "a", "sentence2": "b", "score": 1.0}\n{"sentence1": "cut\n')
    with pytest.raises(ConfigError, match=r"incoming/batch1.jsonl row 2: not valid JSON"):
        run_round(load_retrain_config(None, **world["cfg"]))
    assert not world["fs"].exists(f"{world['prefix']}/state/replay")
    assert not world["fs"].exists(f"{world['prefix']}/state/state.json")

"""Retraining: config validation, the promotion rule and the lock, without training anything."""

from __future__ import annotations

import json
import time

import pytest

from semvec.errors import ConfigError, JobFailed
from semvec.models import ModelCard, write_card
from semvec.retrain.config import load_retrain_config
from semvec.retrain.job import _check_continuable, decide
from semvec.retrain.lock import Lock, LockHeld

BASE = {"name": "m", "task": "sts", "snapshots": ["new/"], "state": "state/",
        "suites": [{"name": "main", "kind": "sts", "data": "dev.csv"},
                   {"name": "guard", "kind": "retrieval", "corpus": "c", "queries": "q", "qrels": "r"}]}


@pytest.mark.parametrize("change, error", [
    ({"suites": [{"name": "x", "kind": "qa", "data": "d"}]}, "suite 'x': unknown suite kind 'qa'"),
    ({"suites": [{"name": "x", "kind": "retrieval", "corpus": "c"}]}, "needs 'queries'"),
    ({"primary": "nope"}, "primary suite 'nope' is not one of"),
    ({"margin": -0.1}, "margin must be a finite number >= 0"),
    ({"train": {"model": "x"}}, "set by the retraining job itself"),
    ({"backfill": {"input": "c.jsonl"}}, "backfill needs \\['output_root'\\]"),
    ({"backfill": {"input": "c", "output_root": "o", "output": "p"}}, "set by the retraining job itself"),
    ({"backfill": {"input": "c", "output_root": "o", "pooling": "xyz"}}, "unknown pooling 'xyz'"),
    ({"backfill": {"input": "c", "output_root": "o", "batch_size": 8}},
     "unknown backfill setting.s. batch_size"),
    ({"train": {"epoch": 2}}, "unknown train setting.s. epoch; allowed: .*epochs"),
    ({"train": [1]}, "train must be a mapping of settings"),
    ({"train": {"epochs": 0}}, "epochs must be a positive integer"),
    ({"method": "qlora"}, "unknown method 'qlora'"),
    ({"lock_timeout_s": 0}, "lock_timeout_s must be a number of seconds >= 1, got 0"),
    ({"suites": [{"name": "intents", "kind": "classification", "data": "d"}]},
     "suite 'intents' .classification. scores a classification model's head, but the challenger is "
     "trained for sts"),
])
def test_bad_retrain_configs_are_refused_with_one_line(change, error):
    with pytest.raises(ConfigError, match=error):
        load_retrain_config(None, **{**BASE, **change})


def test_every_file_a_round_may_read_is_checked_every_night_and_named_by_its_setting(tmp_path):
    """A missing replay file passed on nights without new data (it is read only to train), and
    every missing file said "input ..." whatever setting named it."""
    from semvec.retrain.job import _check

    (tmp_path / "dev.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n')
    (tmp_path / "blank.jsonl").write_text('{"sentence1": "a", "sentence2": " ", "score": 1}\n')
    good = {**BASE, "state": str(tmp_path / "state"), "distill": 0,
            "suites": [{"name": "main", "kind": "sts", "data": str(tmp_path / "dev.jsonl")}]}
    for change, error in (
        ({"replay": [str(tmp_path / "nope.csv")]}, "replay '.*nope.csv' does not exist"),
        ({"dev": str(tmp_path / "gone.csv")}, "dev '.*gone.csv' does not exist"),
        ({"suites": [{"name": "main", "kind": "sts", "data": str(tmp_path / "x.csv")}]},
         "suite 'main' data '.*x.csv' does not exist"),
        ({"backfill": {"input": str(tmp_path / "c"), "output_root": str(tmp_path / "v")}},
         "backfill input '.*c' does not exist"),
        # a bad row of a suite failed the round after training
        ({"suites": [{"name": "main", "kind": "sts", "data": str(tmp_path / "blank.jsonl")}]},
         "blank.jsonl row 1: field 'sentence2' is empty"),
    ):
        with pytest.raises(ConfigError, match=error):
            _check(load_retrain_config(None, **{**good, **change}))
    _check(load_retrain_config(None, **good))


def test_nested_settings_are_typed_and_make_the_jobs_a_round_runs():
    cfg = load_retrain_config(None, **BASE, train={"epochs": 2, "optimizer": "sgd"},
                              backfill={"input": "corpus/", "output_root": "out/", "pooling": "cls"})
    assert cfg.train.epochs == 2 and cfg.train.optimizer.value == "sgd" and cfg.train.workers == 1
    embed = cfg.backfill_config("models:/m/3", "out/v3")
    assert (embed.model, embed.output, embed.input, embed.pooling.value) == ("models:/m/3", "out/v3",
                                                                           "corpus/", "cls")
    tc = cfg.train_config(train="t.jsonl", model="m", output="o", replay="past.jsonl")
    assert (tc.epochs, tc.task.value, tc.distill) == (2, "sts", 1.0)
    plain = cfg.to_dict()
    assert plain["train"]["optimizer"] == "sgd" and plain["backfill"]["pooling"] == "cls"
    json.dumps(plain)  # what MLflow and the summary get


def test_promotion_needs_the_margin_on_primary_and_no_guard_beyond_tolerance():
    cfg = load_retrain_config(None, **BASE, margin=0.01, tolerance=0.02)

    def scores(main, guard):
        return {"main": {"champion": 0.80, "challenger": main},
                "guard": {"champion": 0.50, "challenger": guard}}

    assert decide(cfg, scores(0.811, 0.49))[0] == "promoted"
    assert decide(cfg, scores(0.805, 0.55))[0] == "refused"  # primary gain below the margin
    decision, reasons = decide(cfg, scores(0.90, 0.47))  # a guard lost 0.03 > 0.02
    assert decision == "refused" and "guard ndcg@10 0.5000 -> 0.4700" in reasons[1] and "fails" in reasons[1]


def test_local_lock_refuses_a_second_holder_and_takes_a_stale_one(tmp_path):
    first = Lock(str(tmp_path), timeout_s=60)
    first.acquire()
    with pytest.raises(LockHeld, match="another retraining holds") as held:
        Lock(str(tmp_path), timeout_s=60).acquire()
    assert held.value.exit_code == 3
    record = json.loads((tmp_path / "lock.json").read_text())
    (tmp_path / "lock.json").write_text(json.dumps({**record, "since": time.time() - 120,
                                                    "renewed_at": time.time() - 120}))
    second = Lock(str(tmp_path), timeout_s=60)
    second.acquire()  # not renewed for longer than the timeout: its holder is gone
    assert second.took_stale["token"] == first.token
    first.release()  # not its lock any more: leaves it alone
    assert (tmp_path / "lock.json").exists()
    second.release()
    assert not (tmp_path / "lock.json").exists()


@pytest.mark.parametrize("method, ok", [("full", True), ("lora", True), ("adapter", False),
                                        ("prompt", False)])
def test_retraining_continues_only_champions_whose_weights_are_all_in_the_model(tmp_path, method, ok):
    write_card(tmp_path, ModelCard(pooling="mean", normalize=True, max_length=128, method={"method": method}))
    if ok:
        _check_continuable(tmp_path, "models:/m/1")
    else:
        with pytest.raises(ConfigError, match=f"tuned with {method}"):
            _check_continuable(tmp_path, "models:/m/1")


@pytest.mark.parametrize("method", ["adapter", "prompt"])
def test_a_round_is_not_set_to_train_a_challenger_it_could_not_continue_from(method):
    """Promoted, an adapter or prompt challenger stopped every later round at its start."""
    with pytest.raises(ConfigError, match=f"method {method}: its weights live beside the model"):
        load_retrain_config(None, **{**BASE, "method": method})


def test_a_task_suite_needs_a_champion_with_that_head(tmp_path):
    """A classification guard suite over a champion without a head failed after training (68 s
    with a tiny model), blaming the champion: it is refused before."""
    suites = [{"name": "intents", "kind": "classification", "data": "d"}]
    cfg = load_retrain_config(None, **{**BASE, "task": "classification", "suites": suites})
    write_card(tmp_path, ModelCard(pooling="mean", normalize=True, max_length=128))
    with pytest.raises(ConfigError, match=r"suite 'intents' \(classification\) scores the champion's "
                                          r"classification head, but champion models:/m/1 is no task model"):
        _check_continuable(tmp_path, "models:/m/1", cfg.suites)
    write_card(tmp_path, ModelCard(pooling="mean", normalize=True, max_length=128, task="classification",
                                   labels=["a", "b"]))
    _check_continuable(tmp_path, "models:/m/1", cfg.suites)


def test_a_held_lock_is_renewed_and_a_holder_whose_lock_was_taken_stops_at_its_next_write(tmp_path):
    """A round longer than lock_timeout_s lost its lock to the next night's run, and both wrote
    state.json and moved aliases: the holder renews it now, and checks it before each write."""
    first = Lock(str(tmp_path), timeout_s=1.2)
    first.acquire()
    taken = json.loads((tmp_path / "lock.json").read_text())["renewed_at"]
    time.sleep(2.0)  # longer than the timeout: stale, had it not been renewed
    assert json.loads((tmp_path / "lock.json").read_text())["renewed_at"] > taken
    with pytest.raises(LockHeld, match="another retraining holds"):
        Lock(str(tmp_path), timeout_s=1.2).acquire()
    first.check()  # still its own
    # renewals failed (say the store was down) and another run took it over (its renewals stopped
    # first, so that none lands on the other run's lock in this test)
    first._stop.set()
    first._thread.join()
    (tmp_path / "lock.json").write_text(json.dumps({"token": "other", "since": time.time(),
                                                    "renewed_at": time.time()}))
    with pytest.raises(JobFailed, match="was taken over by another run"):
        first.check()
    first.release()  # not its lock: left alone
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == "other"

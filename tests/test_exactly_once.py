"""Every row exactly once: a crash after every write of the commit protocol, real SIGKILLs at
random moments, and two runs into one prefix. Crashed runs are real processes with a local Ray
of their own; the whole session (driver, Ray, workers) dies by SIGKILL."""

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semvec.backfill.job import run
from semvec.backfill.manifest import LEASE
from semvec.config import load_embed_config
from semvec.crashpoints import kill_session
from semvec.lease import Lease
from semvec.testing import corpus_sentences
from tests.conftest import REPO, VECTOR_ATOL, crash_after

pytestmark = pytest.mark.slow


def bad_and_good_corpus(path: Path, n: int, every: int, seed: int = 5, long: bool = False) -> Path:
    """n rows; every `every`-th row is bad in one of three ways, so each batch holds both kinds.
    long: each text is a few sentences (~150 tokens), so a chunked run splits it."""
    texts = ([". ".join(corpus_sentences(8, seed=seed + i)) for i in range(n)] if long
             else corpus_sentences(n, seed=seed))
    lines = []
    for i, t in enumerate(texts):
        kind = (i // every) % 3 if i % every == 0 else None
        if kind == 0:
            lines.append(f'{{"id": "r{i}", "text": "unterminated')
        elif kind == 1:
            lines.append(json.dumps({"id": f"r{i}", "text": "   "}))
        elif kind == 2:
            lines.append(json.dumps({"id": f"r{i}", "body": t}))
        else:
            lines.append(json.dumps({"id": f"r{i}", "text": t}))
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot(out: Path) -> dict:
    """What a user gets: output rows by id, quarantine rows, the manifest's counts."""
    parts = sorted(glob.glob(str(out / "part-*.parquet")))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    chunked = "chunk" in table.column_names  # one row per chunk: a document's rows by chunk
    table = table.sort_by([("id", "ascending"), ("chunk", "ascending")] if chunked else "id")
    ids = (list(zip(*(table[c].to_pylist() for c in ("id", "chunk", "start", "end")), strict=True))
           if chunked else table["id"].to_pylist())
    quarantine = sorted((r["source"], r["row"], r["id"], r["reason"], r["raw"])
                        for p in glob.glob(str(out / "_quarantine" / "part-*.parquet"))
                        for r in pq.read_table(p).to_pylist())
    manifest = json.loads((out / "_manifest.json").read_text())
    counts = [(i["source"], i["rows"], i["embedded"], i["quarantined"], i["quarantine_reasons"])
              for i in manifest["inputs"]]
    return {"ids": ids,
            "vectors": np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
            "quarantine": quarantine, "totals": manifest["totals"], "inputs": counts,
            "status": manifest["status"], "leftovers": leftovers(out)}


def leftovers(out: Path) -> list[str]:
    """Temporaries of local writes under the output (its quarantine folder too)."""
    return glob.glob(str(out / "**" / "*.tmp-*"), recursive=True)


def assert_same(got: dict, want: dict) -> None:
    assert got["ids"] == want["ids"]  # each row once, none missing
    np.testing.assert_allclose(got["vectors"], want["vectors"], atol=VECTOR_ATOL)
    for key in ("quarantine", "totals", "inputs", "status", "leftovers"):
        assert got[key] == want[key], key


def start_cli(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "semvec.cli", "embed", *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("ray_from_rows,points,torn", [(1, (3, 8), (6,)), (20_000, None, (2, 3, 4, 7))],
                         ids=["on-ray", "without-ray"])
def test_crash_after_every_write_then_rerun_gives_the_uninterrupted_output(ray_local, tiny_models, tmp_path,
                                                                           ray_from_rows, points, torn):
    # two batches, each with good and bad rows: each commits a quarantine part, then its output part;
    # the crashed runs in their own process (a job this small, by default: every write) and on Ray,
    # where the same stage code writes the parts in writer tasks: crashed inside the first batch
    # (3: its quarantine part written, its output part not) and before the last part's rename (6).
    # The lease (1) and the manifest (2, 7) are written by the same driver code both ways, before
    # and after the stages: crashed once, without Ray. `torn` writes are crashed between their
    # temporary and their rename (SEMVEC_CRASH_TORN) instead: without Ray the first manifest's, a
    # quarantine part's, an output part's, the last manifest's; on Ray the last output part's, in
    # a writer task. The rerun removes the temporary (no leftovers).
    src = bad_and_good_corpus(tmp_path / "in.jsonl", 12, every=3)
    want = crash_after_every_write(src, tmp_path, {"model": str(tiny_models["bert"]),
                                                   "ray_from_rows": ray_from_rows}, points=points, torn=torn)
    assert want["totals"] == {"rows": 12, "embedded": 8, "quarantined": 4}
    manifest = json.loads((tmp_path / "crash8" / "_manifest.json").read_text())
    assert manifest["ran_on"] == ("ray" if ray_from_rows == 1 else "driver")


def test_crash_after_every_write_of_a_chunked_job_then_rerun(ray_local, tiny_models, tmp_path):
    # each document a few windows, so the output part holds several rows per document; one batch
    # (a quarantine part, then the output part): the writes between batches are the test above's
    # The lease and manifest writes are the same code in every backfill and crashed in the test
    # above; here the crashes come after the chunked job's own writes, its two parts (3 and 4),
    # and one past the last write (6) counts them. The stages are those a Ray job runs; the run
    # here is without Ray (a job this small), the test above crashes both ways.
    src = bad_and_good_corpus(tmp_path / "in.jsonl", 6, every=3, long=True)
    want = crash_after_every_write(src, tmp_path, {"model": str(tiny_models["bert"]), "chunk_tokens": 32,
                                                   "chunk_overlap": 8}, parts=2, points=(3, 4, 6))
    assert want["totals"]["embedded"] == 4 and want["totals"]["chunks"] > 3 * 4
    assert len({doc for doc, *_ in want["ids"]}) == 4


def crash_after_every_write(src: Path, tmp_path: Path, settings: dict, parts: int = 4,
                            points: tuple[int, ...] | None = None, torn: tuple[int, ...] = ()) -> dict:
    """A crash at each write of the job in turn (or at `points`), each its own process and output,
    each then rerun here: every output must equal the uninterrupted one (returned), which is the
    run armed one past its last write. And a crash before the rename of each write in `torn`,
    which leaves that write's temporary."""
    opts = {**settings, "id_field": "id", "rows_per_file": 6, "batch_rows": 6}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    writes = 1 + 1 + parts + 1  # lease, manifest "running", each part, manifest "complete"
    # Every crash is its own process with its own output; they run a few at a time (most of each
    # is starting Python, and Ray when it runs on Ray), then each output is rerun here and compared.
    crashes = {(n, False): tmp_path / f"crash{n}" for n in points or range(1, writes + 2)}
    crashes.update({(n, True): tmp_path / f"crash{n}-torn" for n in torn})
    assert (writes + 1, False) in crashes  # writes + 1: never fires
    codes = run_at_most(3, {key: (lambda key=key, out=out: start_cli(str(src), str(out), *args,
                                                                    env=crash_env(*key)))
                            for key, out in crashes.items()})
    # one past the last write: the variable never fires, the job ends normally (with one write
    # more than counted, it would have crashed)
    assert codes[writes + 1, False][0] == 0, codes[writes + 1, False][1][-1500:]
    reference = crashes[writes + 1, False]
    # every batch wrote a quarantine part and an output part
    assert len(glob.glob(str(reference / "**" / "part-*.parquet"), recursive=True)) == parts
    want = snapshot(reference)
    for (n, cut), out in crashes.items():
        if n <= writes:
            assert codes[n, cut][0] == -9, f"crash at write {n} did not happen: {codes[n, cut][1][-1500:]}"
            assert not cut or leftovers(out), n  # the temporary is left, as a crash leaves it
            # rerun the default way (without Ray, for a job this small): resuming does not
            # depend on how the crashed run ran
            run(load_embed_config(None, input=str(src), output=str(out),
                                  **{k: v for k, v in opts.items() if k != "ray_from_rows"}))
            assert_same(snapshot(out), want)
    return want


def crash_env(n: int, torn: bool = False) -> dict[str, str]:
    return {"SEMVEC_CRASH_AT": str(n), **({"SEMVEC_CRASH_TORN": "1"} if torn else {})}


def run_at_most(k: int, starts: dict) -> dict:
    """Start the processes k at a time; {key: (exit code, stderr)} once all have ended."""
    pending, running, done = list(starts.items()), {}, {}
    while pending or running:
        while pending and len(running) < k:
            key, start = pending.pop(0)
            running[key] = start()
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                done[key] = (proc.returncode, proc.communicate()[1])
                del running[key]
        time.sleep(0.1)
    return done


def test_sigkill_at_several_moments_with_a_rerun_after_each(ray_local, tiny_models, tmp_path):
    n = 3_000
    src = bad_and_good_corpus(tmp_path / "in.jsonl", n, every=7)
    opts = {"model": str(tiny_models["bert"]), "id_field": "id", "rows_per_file": 500,
            "batch_rows": 250}
    # the killed runs on Ray; the reference and the last rerun in this process, without Ray
    args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()] + ["--ray-from-rows=1"]
    run(load_embed_config(None, input=str(src), output=str(tmp_path / "ref"), **opts))
    want = snapshot(tmp_path / "ref")
    out = tmp_path / "killed"
    kills = 0
    for parts_before_kill in (1, 4):  # of 6 parts: early, then late in the resumed run
        proc = start_cli(str(src), str(out), *args)
        deadline = time.time() + 300
        while len(glob.glob(str(out / "part-*.parquet"))) < parts_before_kill:
            if proc.poll() is not None:
                break  # this rerun finished before the moment came: nothing to kill
            assert time.time() < deadline
            time.sleep(0.05)
        if proc.poll() is None:
            kill_session(proc.pid)
            proc.wait()
            kills += 1
    assert kills == 2
    run(load_embed_config(None, input=str(src), output=str(out), **opts))
    assert_same(snapshot(out), want)


def test_a_second_run_into_a_held_prefix_is_refused_and_changes_nothing(ray_local, tiny_models,
                                                                         tmp_path):
    """The prefix's lease held here, as a running backfill holds it (the S3 case, with a real
    backfill holding it, is in tests/test_faults.py): another run is refused before any work."""
    src = bad_and_good_corpus(tmp_path / "in.jsonl", 40, every=10)
    opts = {"model": str(tiny_models["bert"]), "id_field": "id", "rows_per_file": 16}
    out = tmp_path / "out"
    run(load_embed_config(None, input=str(src), output=str(out), **opts))
    src.write_text(src.read_text() + json.dumps({"id": "new", "text": "a row to do"}) + "\n")
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    with Lease(str(out), LEASE, what="backfill"):
        second = subprocess.run([sys.executable, "-m", "semvec.cli", "embed", str(src), str(out), *args],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 3, second.stderr[-1500:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "held by another backfill" in lines[0], lines
        assert f"pid {os.getpid()}" in lines[0]
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LEASE} == \
            {p: b for p, b in files.items() if p.name != LEASE}
    # released: the next run does the new row
    assert run(load_embed_config(None, input=str(src), output=str(out), **opts))["rows_this_run"] == 41


def test_an_overwrite_cut_short_is_refused_plainly_and_finished_by_overwrite(tiny_models, tmp_path):
    """--overwrite removes the manifest first, then the parts. Killed after the manifest went, and
    after the first part went, the prefix holds parts and no manifest: a plain rerun is refused in
    one line (as OutputMismatch, which a retraining round, whose prefix it is, answers by
    overwriting), and a rerun with --overwrite gives the uninterrupted output."""
    import shutil

    from semvec.errors import OutputMismatch

    src = bad_and_good_corpus(tmp_path / "in.jsonl", 12, every=3)
    opts = {"model": str(tiny_models["bert"]), "id_field": "id", "rows_per_file": 6, "batch_rows": 6}
    reference = tmp_path / "reference"
    run(load_embed_config(None, input=str(src), output=str(reference), **opts))
    want = snapshot(reference)
    for n, write in enumerate(("overwrite: manifest removed", "overwrite: part removed")):
        out = tmp_path / f"cut{n}"
        shutil.copytree(reference, out)
        crashed = start_cli(str(src), str(out), *[f"--{k.replace('_', '-')}={v}" for k, v in opts.items()],
                            "--overwrite", env=crash_after(write))
        _, err = crashed.communicate(timeout=300)
        assert crashed.returncode == -9, f"no crash after {write!r}: {err[-1500:]}"
        assert not (out / "_manifest.json").exists() and glob.glob(str(out / "part-*.parquet"))
        with pytest.raises(OutputMismatch, match="holds no semvec manifest; choose an empty prefix or pass"):
            run(load_embed_config(None, input=str(src), output=str(out), **opts))
        run(load_embed_config(None, input=str(src), output=str(out), overwrite=True, **opts))
        assert_same(snapshot(out), want)


def test_a_changed_input_whose_old_parts_are_removed_part_way_then_rerun(tiny_models, tmp_path):
    """An input rewritten since its vectors were written: its old parts are removed before it is
    read again. Killed after the first went, the rerun removes the rest and gives what a first run
    on the new input gives: no stale vector kept, no row missing or twice."""
    src = bad_and_good_corpus(tmp_path / "in.jsonl", 12, every=3)
    opts = {"model": str(tiny_models["bert"]), "id_field": "id", "rows_per_file": 6, "batch_rows": 6}
    out = tmp_path / "out"
    run(load_embed_config(None, input=str(src), output=str(out), **opts))
    bad_and_good_corpus(src, 12, every=3, seed=11)  # other texts under the same ids
    os.utime(src, (time.time() + 60, time.time() + 60))  # a version (mtime) of its own, surely
    fresh = tmp_path / "fresh"
    run(load_embed_config(None, input=str(src), output=str(fresh), **opts))
    crashed = start_cli(str(src), str(out), *[f"--{k.replace('_', '-')}={v}" for k, v in opts.items()],
                        env=crash_after("stale part removed"))
    _, err = crashed.communicate(timeout=300)
    assert crashed.returncode == -9, err[-1500:]
    assert 0 < len(glob.glob(str(out / "**" / "part-*.parquet"), recursive=True)) < 4  # of 4
    run(load_embed_config(None, input=str(src), output=str(out), **opts))
    assert_same(snapshot(out), snapshot(fresh))

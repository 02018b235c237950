"""`semvec plot`: a PNG map of stored vectors (local and on the S3 server), coloured by a column or
a labels file; opened here as an image; one-line errors; a crash after its one write, then a rerun."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from semvec import storage
from semvec.plot import pca_2d
from tests.conftest import REPO, cli, write_jsonl
from tests.test_search import error_line


def colours(png: bytes | str) -> int:
    """How many distinct colours the picture holds."""
    image = Image.open(png if isinstance(png, str) else io.BytesIO(png)).convert("RGB")
    return len(np.unique(np.asarray(image).reshape(-1, 3), axis=0))


def test_a_map_coloured_by_a_labels_file_is_a_png_with_a_colour_a_label(beir, tmp_path, capsys):
    labels = write_jsonl(tmp_path / "labels.jsonl",
                         [{"id": f"d{i}", "topic": ["red", "green", "blue"][i % 3]} for i in range(150)])
    out = tmp_path / "maps" / "topics.png"
    code, stdout, err = cli(capsys, "plot", beir["docs"], "--output", str(out), "--color-by", "topic",
                            "--labels", str(labels), "--id-field", "id", "--sample", "120", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert (summary["points"], summary["of"], summary["values"]) == (120, beir["n_docs"], 3)
    image = Image.open(out)
    assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 400
    plain = tmp_path / "plain.png"
    assert cli(capsys, "plot", beir["docs"], "--output", str(plain))[0] == 0
    assert colours(str(out)) > colours(str(plain))  # the three topics' colours and their legend
    # a column of the vectors themselves
    by_source = ["plot", beir["docs"], "--output", str(tmp_path / "src.png"), "--color-by", "source"]
    assert cli(capsys, *by_source)[0] == 0


def test_pca_2d_keeps_the_two_widest_directions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * np.array([5, 3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    xy = pca_2d(x)
    assert xy.shape == (500, 2)
    for axis in (0, 1):
        assert abs(np.corrcoef(xy[:, axis], x[:, axis])[0, 1]) > 0.99


def test_every_kept_value_gets_its_own_colour():
    from semvec.figures import colours

    for n in (3, 9, 10, 18, 20, 77):  # 77: BANKING77's intents with --max-colors 77
        assert len(set(colours(n))) == n
        # none grey, the colour of values left out: tab20's greys took the 15th and 16th values
        # of BANKING77's map, which then could not be told from "other"
        assert not [c for c in colours(n) if max(c[:3]) - min(c[:3]) < 0.05], n


def test_bad_input_is_one_line_and_exit_2(beir, tmp_path, capsys):
    cases = [
        (["plot", beir["docs"], "--output", str(tmp_path / "m.jpg")], "must be a .png file"),
        (["plot", beir["docs"], "--output", str(tmp_path / "m.png"), "--color-by", "topic"],
         "is not a column of the vectors"),
        (["plot", beir["docs"], "--output", str(tmp_path / "m.png"), "--method", "tsne"], "unknown method"),
        (["plot", beir["docs"], "--output", str(tmp_path / "m.png"), "--labels", "x.jsonl"],
         "needs --color-by"),
        (["plot", str(tmp_path), "--output", str(tmp_path / "m.png")], "not a backfill output"),
        # found only after the map was drawn, as a FileNotFoundError on a temporary name
        (["plot", beir["docs"], "--output", str(tmp_path / "f.txt" / "m.png")],
         f"output '{tmp_path / 'f.txt' / 'm.png'}' cannot be written there"),
        (["evaluate", "retrieval", "--vectors", beir["docs"], *beir["files"], "--report",
          str(tmp_path / "f.txt" / "r.json")], "cannot be written there"),
    ]
    (tmp_path / "f.txt").write_text("a file")
    for argv, says in cases:
        code, _, err = cli(capsys, *argv)
        assert code == 2 and says in error_line(err), (argv, err)
    assert not (tmp_path / "m.png").exists()


@pytest.mark.slow
def test_a_map_from_and_to_the_s3_server_and_a_crash_after_its_write(beir, s3_env, tmp_path, capsys):
    fs = storage.filesystem("s3://bucket")
    prefix = f"bucket/plot-{tmp_path.name}"
    fs.put(beir["docs"].rstrip("/") + "/", f"{prefix}/docs", recursive=True)
    argv = [sys.executable, "-m", "semvec.cli", "plot", f"s3://{prefix}/docs", "--output",
            f"s3://{prefix}/map.png", "--sample", "60"]
    env = {**os.environ, **s3_env["env"]}
    # the one write is the PNG, whole: a crash right after it leaves the whole picture
    crashed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**env, "SEMVEC_CRASH_AT": "1"})
    assert crashed.returncode == -9, crashed.stderr[-1500:]
    first = fs.cat(f"{prefix}/map.png")
    code, out, err = cli(capsys, *argv[3:])  # the rerun: no crash, so in this process
    assert code == 0, err[-1500:]
    assert s3_env["secret"] not in out + err
    assert fs.cat(f"{prefix}/map.png") == first  # the rerun draws the same picture
    assert Image.open(io.BytesIO(first)).format == "PNG"

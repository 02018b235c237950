"""Training data readers (every format x task, the benchmark layouts, IOB1 -> IOB2, one-line errors)
and the fine-tuning metrics on hand-computed cases; one test reads the real benchmark files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semvec import storage
from semvec.datasets import Task, label_set, load_examples
from semvec.errors import ConfigError
from semvec.metrics import classification_metrics, ner_metrics, retrieval_mrr_ndcg, spearman
from tests.conftest import DATASETS

EXAMPLES = {
    Task.STS: [{"sentence1": "A cat sits.", "sentence2": 'A "cat" is sitting.', "score": 4.2},
               {"sentence1": "A man, a plan.", "sentence2": "Nothing alike.", "score": 0.0}],
    Task.PAIRS: [{"anchor": "what is ray", "positive": "Ray scales Python.", "negative": "A ray of light."},
                 {"anchor": "who wrote it", "positive": "She wrote it, in 1999.", "negative": None}],
    Task.CLASSIFICATION: [{"text": "great, really great", "label": "pos"},
                          {"text": 'not "good"', "label": "neg"}],
    Task.NER: [{"tokens": ["EU", "rejects", "German", "call"], "tags": ["B-ORG", "O", "B-MISC", "O"]},
               {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}],
}


def write(path: Path, rows: list[dict]) -> Path:
    """rows in the file's format, chosen by its extension (.jsonl, .csv, .tsv, .parquet, .conll)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".conll":
        sentences = ["\n".join(f"{w} X X {t}" for w, t in zip(r["tokens"], r["tags"], strict=True))
                     for r in rows]
        path.write_text("-DOCSTART- -X- -X- O\n\n" + "\n\n".join(sentences) + "\n")
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    else:  # tsv: unquoted, as the reader expects
        cells = [list(rows[0])] + [["" if v is None else str(v) for v in r.values()] for r in rows]
        path.write_text("".join("\t".join(c) + "\n" for c in cells))
    return path


MATRIX = [(task, fmt) for task in (Task.STS, Task.PAIRS, Task.CLASSIFICATION)
          for fmt in ("jsonl", "csv", "tsv", "parquet")]
MATRIX += [(Task.NER, fmt) for fmt in ("jsonl", "parquet", "conll")]


@pytest.mark.parametrize(("task", "fmt"), MATRIX, ids=[f"{t.value}-{f}" for t, f in MATRIX])
def test_every_format_and_task_round_trips(tmp_path, task, fmt):
    path = write(tmp_path / f"train.{fmt}", EXAMPLES[task])
    assert load_examples(task, str(path)) == EXAMPLES[task]
    assert load_examples(task.value, f"file://{path}") == EXAMPLES[task]


def upload(local: Path, uri: str) -> str:
    """Put a file through the S3 server: it caches listings, so files dropped into its root stay unseen."""
    storage.filesystem(uri).pipe(storage.strip(uri), local.read_bytes())
    return uri


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_reads_from_s3(s3_env, tmp_path, fmt):
    uri = upload(write(tmp_path / f"t.{fmt}", EXAMPLES[Task.CLASSIFICATION]), f"s3://bucket/data/train.{fmt}")
    assert load_examples(Task.CLASSIFICATION, uri) == EXAMPLES[Task.CLASSIFICATION]


def test_conll_from_s3(s3_env, tmp_path):
    # No extension, as CoNLL-2003 is released.
    uri = upload(write(tmp_path / "t.conll", EXAMPLES[Task.NER]), "s3://bucket/data/eng.train")
    assert load_examples("ner", uri) == EXAMPLES[Task.NER]
    with pytest.raises(ConfigError, match=r"^s3://bucket/data/missing.jsonl does not exist$"):
        load_examples("ner", "s3://bucket/data/missing.jsonl")


def test_labels_are_strings_and_pairs_negative_is_optional(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"sentence": "b", "label": 0.0}\n')
    assert load_examples("classification", str(path)) == [{"text": "a", "label": "1"},
                                                          {"text": "b", "label": "0"}]
    path.write_text('{"anchor": "q", "positive": "p"}\n')
    assert load_examples("pairs", str(path)) == [{"anchor": "q", "positive": "p", "negative": None}]


# ---------------------------------------------------------------- benchmark layouts


def test_stsb_release_layout(tmp_path):
    path = tmp_path / "sts-test.csv"  # tab-separated despite .csv; quotes are literal; extra fields
    path.write_text('main-captions\tMSRvid\t2012test\t0024\t2.500\tA "girl" is styling.\tA girl brushes.\n'
                    'main-news\theadlines\t2015\t0001\t0.000\tOne.\tTwo.\tsrc\tlicence\n')
    assert load_examples("sts", str(path)) == [
        {"sentence1": 'A "girl" is styling.', "sentence2": "A girl brushes.", "score": 2.5},
        {"sentence1": "One.", "sentence2": "Two.", "score": 0.0}]


def test_cnsd_layout(tmp_path):
    path = tmp_path / "cnsd-sts-test.txt"
    path.write_text("2012test-0024||一个女孩在给她的头发做发型。||一个女孩在梳头。||2\n", encoding="utf-8")
    assert load_examples("sts", str(path)) == [
        {"sentence1": "一个女孩在给她的头发做发型。", "sentence2": "一个女孩在梳头。", "score": 2.0}]


def test_trec_layout_is_latin1(tmp_path):
    path = tmp_path / "train_5500.label"
    path.write_bytes("DESC:manner How did serfdom develop ?\nHUM:ind Who is Gra\xf0 ?\r\n".encode("latin-1"))
    assert load_examples("classification", str(path)) == [
        {"text": "How did serfdom develop ?", "label": "DESC"}, {"text": "Who is Gra\xf0 ?", "label": "HUM"}]


def test_sst_and_chnsenticorp_layouts(tmp_path):
    sst = tmp_path / "sentiment-train"
    sst.write_text("it 's a charming journey . \t1\nunflinchingly bleak \t0\n")
    assert load_examples("classification", str(sst)) == [
        {"text": "it 's a charming journey .", "label": "1"}, {"text": "unflinchingly bleak", "label": "0"}]
    dev = tmp_path / "dev.tsv"
    dev.write_text('qid\tlabel\ttext_a\n0\t1\t"好"的酒店\n', encoding="utf-8")
    assert load_examples("classification", str(dev)) == [{"text": '"好"的酒店', "label": "1"}]


# ---------------------------------------------------------------- IOB1 -> IOB2

IOB = [
    (["I-PER", "I-PER", "O"], ["B-PER", "I-PER", "O"]),  # entity opened by I-
    (["I-PER", "B-PER"], ["B-PER", "B-PER"]),  # IOB1's B-: a second entity touching the first
    (["I-LOC", "I-ORG", "I-ORG"], ["B-LOC", "B-ORG", "I-ORG"]),  # type change opens an entity
    (["O", "I-MISC", "I-MISC", "O", "I-MISC"], ["O", "B-MISC", "I-MISC", "O", "B-MISC"]),
    (["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]),  # IOB2 stays as it is
]


@pytest.mark.parametrize(("tags", "iob2"), IOB)
@pytest.mark.parametrize("fmt", ["conll", "jsonl"])
def test_iob1_becomes_iob2(tmp_path, tags, iob2, fmt):
    tokens = [f"w{i}" for i in range(len(tags))]
    path = write(tmp_path / f"t.{fmt}", [{"tokens": tokens, "tags": tags}])
    assert load_examples("ner", str(path)) == [{"tokens": tokens, "tags": iob2}]


def test_conll_tabs_docstart_and_blank_runs(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("-DOCSTART-\tO\n\n\nEU\tI-ORG\r\nsays\tO\n-DOCSTART- -X- O O\nHi O\n\n\n")
    assert load_examples("ner", str(path)) == [{"tokens": ["EU", "says"], "tags": ["B-ORG", "O"]},
                                               {"tokens": ["Hi"], "tags": ["O"]}]


# ---------------------------------------------------------------- one-line errors

ERRORS = [
    ("classification", "train.jsonl", '{"text": "a", "label": "x"}\n' * 6 + '{"text": "b"}\n',
     "train.jsonl row 7: missing field 'label'"),
    ("ner", "train.conll", "EU B-ORG\n\n" * 5 + "x O\nlonely\n",
     "train.conll line 12: expected 2+ columns, got 1"),
    ("sts", "dev.csv", "sentence1,sentence2,score\na,b,1\nc,d,abc\n",
     "dev.csv row 3: score 'abc' is not a number"),
    ("sts", "dev.tsv", "sentence1\tsentence2\tscore\na\tb\n", "dev.tsv row 2: expected 3 columns, got 2"),
    ("sts", "sts-dev.csv", "g\tf\t2012\t1\t3.0\ta\tb\ng\tf\t2012\t2\t3.0\ta\n",
     "sts-dev.csv row 2: expected 7+ columns"),
    ("sts", "cnsd.txt", "1||a||b||3\n2||a||x\n", "cnsd.txt row 2: expected 4 '||'-separated fields"),
    ("pairs", "p.jsonl", '{"anchor": "a", "positive": "b"}\n[1]\n', "p.jsonl row 2: expected a JSON object"),
    ("pairs", "p.jsonl", '{"anchor": "a", "positive": 3}\n',
     "p.jsonl row 1: field 'positive' is int, not text"),
    ("classification", "q.label", "DESC:manner ok ?\nno label here\n",
     "q.label row 2: expected 'COARSE:fine"),
    ("ner", "t.conll", "EU B-ORG\nsays 0\n", "t.conll line 2: tag '0' is not O, B-TYPE or I-TYPE"),
    ("ner", "t.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', "t.jsonl row 1: 2 tokens but 1 tags"),
    ("classification", "empty.jsonl", "\n\n", "empty.jsonl holds no examples"),
    ("ner", "empty.conll", "-DOCSTART- -X- O O\n\n", "empty.conll holds no examples"),
    ("classification", "header.csv", "text,label\n", "header.csv holds no examples"),
    ("classification", "t.csv", "words,category\nhi,x\n", "t.csv row 2: missing field 'text'"),
    # used silently in training and scoring: `semvec embed` quarantines such a text (empty_text)
    ("sts", "blank.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n'
                           '{"sentence1": "  ", "sentence2": "b", "score": 2}\n',
     "blank.jsonl row 2: field 'sentence1' is empty"),
    ("classification", "notes.txt", "just some text\n", "notes.txt: cannot tell its format"),
    ("summarise", "t.jsonl", "{}\n", "unknown task 'summarise'; allowed: sts, pairs, classification, ner"),
]


@pytest.mark.parametrize(("task", "name", "content", "message"), ERRORS, ids=[e[3][:40] for e in ERRORS])
def test_errors_are_one_line_naming_file_and_row(tmp_path, task, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_examples(task, str(path))
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{tmp_path}/{message}") or (task == "summarise" and text == message), text


def test_invalid_utf8_is_an_error_outside_trec(tmp_path):
    path = tmp_path / "sentiment-train"
    path.write_bytes(b"fine\t1\nGra\xf0\t0\n")
    with pytest.raises(ConfigError, match=r"sentiment-train line 2: not valid UTF-8 \(byte 0xF0\)"):
        load_examples("classification", str(path))


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.jsonl does not exist"):
        load_examples("sts", str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match=r"bad.parquet: not a parquet file"):
        load_examples("sts", str(tmp_path / "bad.parquet"))


def test_parquet_rows_are_numbered(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "score": x} for x in (1.0, None)]
    path = write(tmp_path / "t.parquet", rows)
    with pytest.raises(ConfigError, match=r"t.parquet row 2: missing field 'score'"):
        load_examples("sts", str(path))


# ---------------------------------------------------------------- label_set


def test_label_set_classification_and_dev_check(tmp_path):
    train_path = write(tmp_path / "train.jsonl", EXAMPLES[Task.CLASSIFICATION])
    train = load_examples("classification", str(train_path))
    dev_rows = [{"text": "meh", "label": "neutral"}]
    dev = load_examples("classification", str(write(tmp_path / "dev.jsonl", dev_rows)))
    assert label_set(train, train, "classification") == ["neg", "pos"]
    with pytest.raises(ConfigError) as info:
        label_set(train, dev, Task.CLASSIFICATION)
    assert str(info.value) == f"dev label 'neutral' ({tmp_path / 'dev.jsonl'}) does not occur in train"
    with pytest.raises(ConfigError, match=r"^dev label 'neutral' does not occur in train$"):
        label_set(train, dev_rows, Task.CLASSIFICATION)  # a held-out slice has no file to name


def test_label_set_ner_sts_pairs():
    train = [{"tokens": ["a", "b"], "tags": ["B-PER", "O"]}]
    dev = [{"tokens": ["x", "y"], "tags": ["B-PER", "I-PER"]}]  # I-PER: never in train, still valid
    assert label_set(train, dev, "ner") == ["B-PER", "I-PER", "O"]
    with pytest.raises(ConfigError, match=r"dev label 'B-LOC'"):
        label_set(train, [{"tokens": ["x"], "tags": ["B-LOC"]}], "ner")
    assert label_set(EXAMPLES[Task.STS], EXAMPLES[Task.STS], "sts") == []
    assert label_set(EXAMPLES[Task.PAIRS], [], Task.PAIRS) == []
    with pytest.raises(ConfigError, match=r"unknown task 'x'; allowed: sts, pairs, classification, ner"):
        label_set([], [], "x")


# ---------------------------------------------------------------- metrics


def test_spearman_hand_computed():
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * (0 + 1 + 1) / (3 * 8)
    assert spearman(np.array([0.1, 0.2, 0.3, 0.4]), [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_classification_metrics_hand_computed():
    m = classification_metrics(pred=["a", "b", "b", "a"], gold=["a", "a", "b", "c"])
    # F1 per label: a (P 1/2, R 1/2) 1/2; b (P 1/2, R 1) 2/3; c 0 -> macro 7/18.
    assert m == pytest.approx({"accuracy": 0.5, "macro_f1": 7 / 18})
    with pytest.raises(ValueError):
        classification_metrics(["a"], ["a", "b"])


def test_ner_metrics_one_wrong_entity_type():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG"]]
    m = ner_metrics(pred, gold)  # 3 gold, 3 predicted, 2 right
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    lines = {line.split()[0]: line.split()[1:] for line in m["report"].splitlines() if line.strip()}
    assert lines["LOC"] == ["0.0000", "0.0000", "0.0000", "1"]
    assert lines["ORG"] == ["0.5000", "1.0000", "0.6667", "1"]
    assert lines["PER"] == ["1.0000", "1.0000", "1.0000", "1"]


def test_ner_metrics_is_strict_iob2():
    # Lenient (conlleval) scoring would count I-PER I-PER as a PER entity; strict IOB2 does not.
    m = ner_metrics([["I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert ner_metrics([["O"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError, match="sentence 0"):
        ner_metrics([["O"]], [["O", "O"]])


def test_label_reports_hand_computed():
    from semvec.metrics import label_report, ner_label_report

    r = label_report(["a", "a", "b", "c"], ["a", "b", "b", "b"], ["b", "a"])
    assert r["confusion"] == {"labels": ["b", "a", "c"], "rows": "gold", "columns": "predicted",
                              "matrix": [[1, 1, 1], [0, 1, 0], [0, 0, 0]]}  # c: predicted, never gold
    assert r["per_label"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert r["per_label"]["b"] == {"precision": 1.0, "recall": pytest.approx(1 / 3), "f1": 0.5, "support": 3}
    assert r["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    n = ner_label_report([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]],
                         ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"])
    assert n["per_label"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert n["per_label"]["ORG"]["recall"] == 0.0 and n["per_label"]["LOC"]["precision"] == 0.0
    assert n["confusion"]["matrix"][4] == [0, 0, 0, 1, 0]  # the gold B-ORG token was tagged B-LOC


def test_retrieval_hand_computed():
    scores = np.array([[0.1, 0.9, 0.5], [0.9, 0.8, 0.7]])
    m = retrieval_mrr_ndcg(scores, [{2}, {1, 2}])
    # q0 ranks 1, 2, 0: hit at rank 2. q1 ranks 0, 1, 2: hits at ranks 2 and 3.
    ndcg0 = 1 / math.log2(3)
    ndcg1 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m == pytest.approx({"mrr@10": 0.5, "ndcg@10": (ndcg0 + ndcg1) / 2})
    assert retrieval_mrr_ndcg(scores, [{2}, {1, 2}], k=1) == {"mrr@1": 0.0, "ndcg@1": 0.0}
    assert retrieval_mrr_ndcg(np.zeros((1, 3)), [{0}]) == {"mrr@10": 1.0, "ndcg@10": 1.0}  # ties: doc order
    with pytest.raises(ValueError, match="query 0"):
        retrieval_mrr_ndcg(scores, [set(), {1}])


def test_mnrl_leaves_other_positives_of_an_anchor_out_of_its_negatives():
    """A batch of customer queries holds several of one intent (one answer entry), and a claim
    cites several abstracts: such candidates are positives of the anchor, not negatives."""
    import torch
    import torch.nn.functional as F

    from semvec.heads import also_positive
    from semvec.train.tasks import mnrl

    examples = [{"anchor": "lost card", "positive": "Entry: lost cards"},
                {"anchor": "card missing", "positive": "Entry: lost cards"},
                {"anchor": "claim", "positive": "abstract 1"},
                {"anchor": "claim", "positive": "abstract 2"},
                {"anchor": "top up", "positive": "Entry: top-ups", "negative": "Entry: lost cards"}]
    candidates = [e["positive"] for e in examples] + ["Entry: lost cards"]
    mask = also_positive(examples, candidates)
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = expected[0, 5] = expected[1, 5] = True  # the same entry
    expected[2, 3] = expected[3, 2] = True  # the same claim's other abstract
    assert torch.equal(mask, expected)  # the hard negative stays a negative for "top up"

    torch.manual_seed(0)
    a, c = torch.randn(5, 8), torch.randn(6, 8)
    sims = 20.0 * F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T
    by_hand = torch.stack([torch.logsumexp(sims[i][~mask[i]], 0) - sims[i, i] for i in range(5)]).mean()
    assert mnrl(a, c, False, mask).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert mnrl(a, c, False).item() > by_hand.item()  # unmasked, the same entry counts against it
    by_hand_t = torch.stack([torch.logsumexp(sims[:, j][~mask[:, j]][:5], 0) - sims[j, j]
                             for j in range(5)]).mean()
    assert mnrl(a, c, True, mask).item() == pytest.approx(((by_hand + by_hand_t) / 2).item(), rel=1e-5)


def test_the_collator_masks_an_anchors_other_positives_and_the_loss_uses_the_mask(tiny_models, tmp_path):
    """The wiring: a pairs batch carries also_positive, and TrainModel's loss leaves those out."""
    import torch

    from semvec.heads import Collator
    from semvec.train.config import Method
    from semvec.train.job import plan
    from semvec.train.loop import build_model
    from semvec.train.tasks import mnrl
    from tests.test_train import tiny_config

    cfg = tiny_config(Task.PAIRS, Method.FULL, tmp_path, tiny_models, workers=1)
    p, _, _ = plan(cfg)
    model, tok = build_model(cfg, p)
    examples = [{"anchor": "lost card", "positive": "entry one"},
                {"anchor": "card gone", "positive": "entry one"},
                {"anchor": "top up", "positive": "entry two"}]
    batch = Collator(tok, Task.PAIRS, 32, [])(examples)
    assert batch["also_positive"].tolist() == [[False, True, False], [True, False, False], [False] * 3]
    model.eval()
    with torch.no_grad():
        a, b = model.embed(batch["a"]), model.embed(batch["b"])
        assert model(batch).item() == pytest.approx(mnrl(a, b, False, batch["also_positive"]).item())
        assert model(batch).item() != pytest.approx(mnrl(a, b, False).item())


def test_held_out_dev_keeps_an_anchors_pairs_on_one_side(tmp_path):
    from semvec.train.config import load_train_config
    from semvec.train.job import _hold_out

    rows = [{"anchor": f"claim {i // 3}", "positive": f"abstract {i}", "negative": None} for i in range(300)]
    cfg = load_train_config(None, task="pairs", method="full", train="x.jsonl", output=str(tmp_path / "m"))
    dev, train = _hold_out(rows, cfg)
    assert len(dev) == 30 and len(train) == 270  # 10 of the 100 claims, with all three abstracts
    assert not {e["anchor"] for e in dev} & {e["anchor"] for e in train}
    cfg = load_train_config(None, task="sts", method="full", train="x.jsonl", output=str(tmp_path / "m"))
    assert len(_hold_out(rows, cfg)[0]) == 30  # other tasks: example by example


def test_the_per_label_chart_ranks_worst_first_and_leaves_out_labels_without_dev_examples():
    from semvec.figures import ranked_labels
    from semvec.train.report import most_confused

    per = {"a": {"f1": 0.9, "support": 3}, "b": {"f1": 0.2, "support": 1}, "c": {"f1": 0.0, "support": 0},
           "d": {"f1": 0.2, "support": 2}}
    assert ranked_labels(per) == ["b", "d", "a"]
    confusion = {"labels": ["a", "b", "d"], "matrix": [[3, 0, 1], [2, 1, 0], [0, 0, 2]]}
    assert most_confused(confusion) == [{"gold": "b", "predicted": "a", "count": 2},
                                        {"gold": "a", "predicted": "d", "count": 1}]


def test_pairs_dev_metric_ranks_distinct_positives_and_counts_each_anchor_once():
    """Dev examples sharing an answer entry rank the distinct entries; a claim with two abstracts
    is one query with two relevant documents. Here every anchor finds its positives first."""
    import torch

    from semvec.heads import task_metrics

    vec = {"q1": [1, 0, 0], "q2": [1, 0.1, 0], "e1": [1, 0, 0], "claim": [0, 1, 1],
           "a1": [0, 1, 0.9], "a2": [0, 0.9, 1], "e2": [0, 0, 1]}

    class Texts:  # embeds texts through the table above, as a model and its collator would
        task, training = Task.PAIRS, False

        def eval(self):
            pass

        def train(self, mode):
            pass

        def _texts(self, texts):
            return texts

        def embed(self, texts):
            return torch.tensor([vec[t] for t in texts], dtype=torch.float)

    examples = [{"anchor": "q1", "positive": "e1"}, {"anchor": "q2", "positive": "e1"},
                {"anchor": "claim", "positive": "a1"}, {"anchor": "claim", "positive": "a2"}]
    m = task_metrics(Texts(), Texts(), examples, [])
    assert m == {"mrr@10": 1.0, "ndcg@10": 1.0}
    vec["e2"] = [1, 0.05, 0]  # a distinct entry nearer q2 than its own: q2's MRR halves
    vec["x"] = [1, 0.05, 0]
    m = task_metrics(Texts(), Texts(), examples + [{"anchor": "x", "positive": "e2"}], [])
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    # a dev corpus adds documents to rank: one nearer q2 than its entry halves q2's MRR; a
    # corpus document that is a positive's own text is that positive, not a second copy
    vec["near q2"] = [1, 0.1, 0]
    m = task_metrics(Texts(), Texts(), examples, [], corpus=["near q2", "e1", "a1"])
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_documents_for_a_dev_corpus_are_read_from_jsonl_beir_and_txt(tmp_path):
    import gzip

    from semvec.datasets import load_documents

    beir = tmp_path / "corpus.jsonl.gz"
    beir.write_bytes(gzip.compress(b'{"_id": "1", "title": "A title", "text": "the text"}\n'
                                   b'{"_id": "2", "text": "no title"}\n{"_id": "3", "text": "  "}\n'))
    assert load_documents(str(beir)) == ["A title the text", "no title"]
    txt = tmp_path / "docs.txt"
    txt.write_text("one\n\ntwo\n")
    assert load_documents(str(txt)) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: has no 'text'"):
        load_documents(str(bad))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no documents"):
        load_documents(str(tmp_path / "empty.txt"))


def test_a_dev_corpus_is_for_the_pairs_task_only(tmp_path):
    from semvec.train.config import load_train_config

    with pytest.raises(ConfigError, match="dev_corpus ranks documents for the pairs task"):
        load_train_config(None, task="sts", method="full", train="t.jsonl", output=str(tmp_path / "o"),
                          dev_corpus="docs.jsonl")


# ---------------------------------------------------------------- the real benchmark files


def test_real_benchmark_files():
    assert DATASETS.is_dir(), f"benchmark data not found at {DATASETS}; set SEMVEC_DATASETS"
    conll = DATASETS / "conll2003"
    iob1 = load_examples("ner", str(conll / "iob1_original" / "eng.train"))
    iob2 = load_examples("ner", str(conll / "iob2" / "train.txt"))
    assert len(iob1) == len(iob2) == 14041
    assert iob1[:500] == iob2[:500]
    assert iob1 == iob2  # SOURCE.md: converting IOB1 gives exactly the IOB2 release
    trec = load_examples("classification", str(DATASETS / "trec" / "train_5500.label"))
    assert len(trec) == 5452
    assert sorted({e["label"] for e in trec}) == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    stsb = load_examples("sts", str(DATASETS / "stsb" / "sts-test.csv"))
    assert len(stsb) == 1379 and all(0.0 <= e["score"] <= 5.0 for e in stsb)
    cnsd = load_examples("sts", str(DATASETS / "zh_similarity" / "cnsd_stsb" / "cnsd-sts-test.txt"))
    assert len(cnsd) == 1361 and {e["score"] for e in cnsd} == {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
    sst = load_examples("classification", str(DATASETS / "sst2" / "sentiment-dev"))
    assert len(sst) == 872 and {e["label"] for e in sst} == {"0", "1"}
    chn = load_examples("classification", str(DATASETS / "chnsenticorp" / "dev.tsv"))
    assert len(chn) == 1200
    bank = load_examples("classification", str(DATASETS / "banking77" / "train.csv"))  # text,category
    assert len(bank) == 10003 and len({e["label"] for e in bank}) == 77
    assert label_set(iob2, load_examples("ner", str(conll / "iob2" / "valid.txt")), "ner") == [
        "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER", "O"]


def test_a_label_the_held_out_dev_would_take_from_train_is_trained_on_instead(tmp_path):
    # it was refused as "dev label 'rare' does not occur in train", naming a dev the user never gave
    from semvec.train.config import load_train_config
    from semvec.train.job import _hold_out, _keep_labels_in_train

    rows = [{"text": f"t {i}", "label": "common"} for i in range(40)] + [{"text": "r", "label": "rare"}]
    cfg = load_train_config(None, task="classification", method="full", train="x.jsonl",
                            output=str(tmp_path / "m"))
    for seed in range(20):  # some seed holds the one rare example out
        cfg.seed = seed
        held, kept = _hold_out(rows, cfg)
        if any(e["label"] == "rare" for e in held):
            break
    dev, train = _keep_labels_in_train(held, kept, cfg)
    assert {e["label"] for e in dev} == {"common"} and len(dev) == len(held) - 1
    assert sorted(e["text"] for e in dev + train) == sorted(e["text"] for e in rows)
    assert _keep_labels_in_train(dev, train, cfg) == (dev, train)  # nothing to move: unchanged
    only_rare = [{"text": "r", "label": "rare"}]
    with pytest.raises(ConfigError, match="too small to hold out dev examples.*give dev data"):
        _keep_labels_in_train(only_rare, [{"text": "c", "label": "common"}], cfg)


def test_past_data_leaves_blank_texts_out_and_says_how_many(tmp_path, caplog):
    """Replayed data kept from before blank texts were refused must not stop every later round."""
    from semvec.datasets import load_examples

    path = tmp_path / "past.jsonl"
    path.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n'
                    '{"sentence1": " ", "sentence2": "b", "score": 2}\n')
    assert [e["sentence1"] for e in load_examples("sts", str(path), skip_blank=True)] == ["a"]
    assert "past.jsonl: 1 example(s) with an empty text left out" in caplog.text
    with pytest.raises(ConfigError, match="row 2: field 'sentence1' is empty"):
        load_examples("sts", str(path))

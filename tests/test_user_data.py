"""The user's data files (zoprivacy.finetune.user_data): formats, the public label set, the carved
split, every bad-file error, and that nothing states the training file's size or quotes its
records."""

import importlib.util
import json
import re
import tempfile
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoprivacy.finetune._setup import SetupError, TaskData
from zoprivacy.finetune.user_data import FORMATS, UserData, carve, load_user_data

TRAIN = {
    "text": ["good film", "bad film", "great", "awful", "fine", "dull", "superb", "weak"],
    "label": ["pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg"],
}
TEST = {"text": ["nice", "poor", "lovely"], "label": ["pos", "neg", "pos"]}


def write(path: Path, columns: dict[str, list]) -> Path:
    """Write ``columns`` as CSV, JSON Lines or Parquet by the suffix (pandas, pyarrow)."""
    frame = pd.DataFrame(columns)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix in (".jsonl", ".json"):
        rows = [
            dict(zip(columns, values, strict=True))
            for values in zip(*columns.values(), strict=True)
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        frame.to_parquet(path, index=False)
    return path


def error(**kwargs) -> str:
    with pytest.raises(SetupError) as info:
        load_user_data(**kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- formats and shape


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_each_format_loads_into_the_task_data_shape(tmp_path, suffix):
    train = write(tmp_path / f"train{suffix}", TRAIN)
    test = write(tmp_path / f"test{suffix}", TEST)
    data = load_user_data(train, test, seed=0)
    assert isinstance(data, TaskData) and isinstance(data, UserData)
    assert data.label_names == ("neg", "pos")  # sorted distinct labels of the test file
    assert data.label_source == "--test-file"
    assert data.train_texts == TRAIN["text"]
    assert data.train_labels == [("neg", "pos").index(x) for x in TRAIN["label"]]
    assert data.test_texts == TEST["text"] and data.test_labels == [1, 0, 1]
    assert data.validation_texts == [] and not data.test_is_private
    assert data.private_parts == () and data.name == train.name
    assert data.public_summary["test"] == {
        "source": "--test-file",
        "records": 3,
        "class_counts": {"neg": 1, "pos": 2},
    }


def test_formats_give_the_same_data(tmp_path):
    loaded = []
    for suffix in (".csv", ".jsonl", ".parquet"):
        train = write(tmp_path / f"train{suffix}", TRAIN)
        test = write(tmp_path / f"test{suffix}", TEST)
        data = load_user_data(train, test, seed=3, validation_size=2)
        loaded.append((data.train_texts, data.train_labels, data.validation_texts, data.indices))
    assert loaded[0] == loaded[1] == loaded[2]


def test_integer_labels_are_named_by_value_or_index(tmp_path):
    train = write(tmp_path / "train.csv", {"text": TRAIN["text"], "label": [0, 1] * 4})
    test = write(tmp_path / "test.csv", {"text": ["a", "b"], "label": [1, 0]})
    data = load_user_data(train, test, seed=0)
    assert data.label_names == ("0", "1") and data.train_labels == [0, 1] * 4
    named = load_user_data(train, test, seed=0, labels="neg,pos")  # words: class indices
    assert named.label_names == ("neg", "pos") and named.train_labels == [0, 1] * 4
    stars = write(tmp_path / "stars.csv", {"text": TRAIN["text"], "label": [5, 3, 4] * 2 + [3, 5]})
    star_test = write(tmp_path / "stars_test.csv", {"text": ["a", "b", "c"], "label": [3, 4, 5]})
    by_value = load_user_data(stars, star_test, seed=0)
    assert by_value.label_names == ("3", "4", "5")
    assert by_value.train_labels == [2, 0, 1, 2, 0, 1, 0, 2]
    given_values = load_user_data(stars, star_test, seed=0, labels=["5", "4", "3"])
    assert given_values.train_labels == [0, 2, 1, 0, 2, 1, 2, 0]


def test_explicit_labels_keep_their_order(tmp_path):
    train = write(tmp_path / "train.jsonl", TRAIN)
    test = write(tmp_path / "test.jsonl", TEST)
    data = load_user_data(train, test, seed=0, labels=("pos", "neg"))
    assert data.label_names == ("pos", "neg") and data.label_source == "--labels"
    assert data.test_labels == [0, 1, 0]


def test_text_pairs_and_custom_columns(tmp_path):
    columns = {"premise": TRAIN["text"], "hypothesis": TRAIN["text"][::-1], "y": TRAIN["label"]}
    train = write(tmp_path / "train.parquet", columns)
    test = write(tmp_path / "test.parquet", {"premise": ["a"], "hypothesis": ["b"], "y": ["neg"]})
    data = load_user_data(
        train,
        test,
        seed=0,
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="y",
        labels="neg,pos",
    )
    assert data.train_pairs == columns["hypothesis"] and data.test_pairs == ["b"]
    assert data.train_targets is None and not data.is_generation


def test_generation_targets_have_no_label_set(tmp_path):
    columns = {"text": TRAIN["text"], "answer": [t.upper() for t in TRAIN["text"]]}
    train = write(tmp_path / "train.jsonl", columns)
    test = write(tmp_path / "test.jsonl", {"text": ["q"], "answer": ["Q"]})
    data = load_user_data(train, test, seed=0, target_column="answer")
    assert data.is_generation and data.label_names == () and data.label_source == ""
    assert data.train_targets == columns["answer"] and data.test_targets == ["Q"]
    assert data.train_labels == [] and data.test_labels == []
    assert data.public_summary["test"] == {"source": "--test-file", "records": 1}


# --------------------------------------------------------------------------- the carved split


def test_carved_test_split_is_flagged_private(tmp_path):
    train = write(tmp_path / "train.csv", TRAIN)
    data = load_user_data(train, seed=5, labels="neg,pos", test_size=3, validation_size=2)
    assert data.test_is_private and data.private_parts == ("validation", "test")
    assert len(data.test_texts) == 3 and len(data.validation_texts) == 2
    parts = [data.train_texts, data.validation_texts, data.test_texts]
    assert sorted(t for part in parts for t in part) == sorted(
        TRAIN["text"]
    )  # disjoint and complete
    assert data.public_summary["test"]["covered_by_guarantee"] is False
    for text, label in zip(data.test_texts, data.test_labels, strict=True):
        assert data.label_names[label] == TRAIN["label"][TRAIN["text"].index(text)]


def test_carved_split_is_the_same_with_and_without_validation(tmp_path):
    train = write(tmp_path / "train.csv", TRAIN)
    alone = load_user_data(train, seed=9, labels="neg,pos", test_size=2)
    both = load_user_data(train, seed=9, labels="neg,pos", test_size=2, validation_size=3)
    assert alone.test_texts == both.test_texts


def _multisets(records, parts):
    return {name: Counter(records[i] for i in idx) for name, idx in parts.items()}


records_strategy = st.lists(
    st.tuples(st.text(max_size=6), st.sampled_from(["a", "b", "c"])), min_size=4, max_size=40
)


@given(records=records_strategy, seed=st.integers(0, 2**32), data=st.data())
def test_carve_is_a_function_of_the_seed_and_the_records_only(records, seed, data):
    n_test = data.draw(st.integers(0, len(records) // 2))
    n_val = data.draw(st.integers(0, len(records) - n_test - 1))
    parts = carve(records, seed=seed, test_size=n_test, validation_size=n_val)
    assert sorted(i for part in parts.values() for i in part) == list(range(len(records)))
    assert (len(parts["test"]), len(parts["validation"])) == (n_test, n_val)
    shuffled = data.draw(st.permutations(records))
    again = carve(shuffled, seed=seed, test_size=n_test, validation_size=n_val)
    assert _multisets(shuffled, again) == _multisets(records, parts)  # not the file's order


@given(records=records_strategy, seed=st.integers(0, 2**32), data=st.data())
def test_carve_keeps_neighbouring_files_neighbouring(records, seed, data):
    """Removing one record of the file removes exactly one record from the training part."""
    n_test = data.draw(st.integers(0, (len(records) - 2) // 2))
    n_val = data.draw(st.integers(0, len(records) - n_test - 2))
    drop = data.draw(st.integers(0, len(records) - 1))
    neighbour = records[:drop] + records[drop + 1 :]
    full = _multisets(records, carve(records, seed=seed, test_size=n_test, validation_size=n_val))
    less = _multisets(
        neighbour, carve(neighbour, seed=seed, test_size=n_test, validation_size=n_val)
    )
    difference = full["train"] - less["train"]
    assert sum(difference.values()) == 1 and not less["train"] - full["train"]


def test_carve_depends_on_the_seed():
    records = [(f"record {i}", "a") for i in range(200)]
    splits = {tuple(carve(records, seed=s, test_size=20)["test"]) for s in range(5)}
    assert len(splits) == 5
    assert carve(records, seed=3, test_size=20) == carve(records, seed=3, test_size=20)


def test_carve_refuses_sizes_that_leave_no_training_record():
    with pytest.raises(ValueError, match="leave no training record"):
        carve([("a",), ("b",)], seed=0, test_size=1, validation_size=1)


# --------------------------------------------------------------------------- errors


@pytest.fixture
def files(tmp_path):
    return write(tmp_path / "train.csv", TRAIN), write(tmp_path / "test.csv", TEST)


def test_missing_file_and_unknown_suffix(tmp_path, files):
    train, test = files
    assert "no such file" in error(train_file=tmp_path / "nope.csv", test_file=test, seed=0)
    message = error(train_file=train, test_file=tmp_path / "test.xlsx", seed=0)
    assert "--test-file" in message and "unknown suffix '.xlsx'" in message
    assert set(FORMATS) == {".csv", ".jsonl", ".json", ".parquet"}


def test_missing_column_lists_the_columns_present(files):
    train, test = files
    message = error(train_file=train, test_file=test, seed=0, label_column="sentiment")
    assert "--train-file" in message and str(train) in message
    assert "no column 'sentiment' (--label-column)" in message
    assert "'text', 'label'" in message


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_file(tmp_path, files, content):
    empty = tmp_path / "empty.csv"
    empty.write_text(content)
    message = error(train_file=empty, test_file=files[1], seed=0)
    assert "--train-file" in message and "empty" in message
    assert "empty" in error(train_file=files[0], test_file=empty, seed=0)


def test_empty_jsonl(tmp_path, files):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "empty" in error(train_file=empty, test_file=files[1], seed=0)


def test_training_label_outside_the_label_set_is_not_quoted(tmp_path, files):
    labels = [*TRAIN["label"][:-1], "secret-class"]
    train = write(tmp_path / "train2.csv", {"text": TRAIN["text"], "label": labels})
    message = error(train_file=train, test_file=files[1], seed=0)
    assert "a training record has a label outside the label set of --test-file" in message
    assert "secret-class" not in message
    message = error(train_file=train, test_file=files[1], seed=0, labels="neg,pos")
    assert "a training record has a label outside --labels" in message
    assert "secret-class" not in message


def test_test_label_outside_the_label_set_is_quoted(tmp_path, files):
    test = write(tmp_path / "test2.csv", {"text": ["a", "b"], "label": ["pos", "mixed"]})
    message = error(train_file=files[0], test_file=test, seed=0, labels="neg,pos")
    assert (
        "--test-file" in message and "record 2 has the label 'mixed', outside --labels" in message
    )


def test_single_class(tmp_path, files):
    test = write(tmp_path / "one.csv", {"text": ["a", "b"], "label": ["pos", "pos"]})
    message = error(train_file=files[0], test_file=test, seed=0)
    assert "--test-file" in message and "two classes" in message
    assert "two classes" in error(train_file=files[0], test_file=files[1], seed=0, labels="pos")


@pytest.mark.parametrize("where", ["train", "test"])
def test_non_text_values(tmp_path, files, where):
    texts = [*TRAIN["text"][:3], 987654321, *TRAIN["text"][4:]]
    bad = write(tmp_path / f"{where}.jsonl", {"text": texts, "label": TRAIN["label"]})
    if where == "train":
        message = error(train_file=bad, test_file=files[1], seed=0)
        assert "not text" in message and "987654321" not in message
    else:
        message = error(train_file=files[0], test_file=bad, seed=0)
        assert "987654321" in message and "record 4" in message  # public: quoted


def test_missing_text_cell_in_csv(tmp_path, files):
    bad = write(tmp_path / "bad.csv", {"text": ["a", None, "c"], "label": ["pos", "neg", "pos"]})
    assert "not text" in error(train_file=bad, test_file=files[1], seed=0)


def test_mixed_integer_and_string_labels(tmp_path, files):
    mixed = write(tmp_path / "mixed.jsonl", {"text": ["a", "b", "c"], "label": [0, "pos", 1]})
    assert "mixes integer and string labels" in error(train_file=mixed, test_file=files[1], seed=0)
    integers = write(tmp_path / "ints.csv", {"text": ["a", "b", "c"], "label": [0, 1, 1]})
    message = error(train_file=integers, test_file=files[1], seed=0)
    assert "int labels" in message and "str labels" in message


def test_missing_and_non_integer_labels(tmp_path, files):
    missing = write(tmp_path / "missing.csv", {"text": ["a", "b"], "label": ["pos", None]})
    assert "a missing label in a training record" in error(
        train_file=missing, test_file=files[1], seed=0
    )
    floats = write(tmp_path / "floats.jsonl", {"text": ["a", "b"], "label": [0.5, 1.5]})
    assert "not a string or int" in error(train_file=floats, test_file=files[1], seed=0)


def test_option_errors(files):
    train, test = files
    assert "drop --test-size" in error(train_file=train, test_file=test, seed=0, test_size=2)
    assert "give --test-size" in error(train_file=train, seed=0, labels="neg,pos")
    assert "give --labels" in error(train_file=train, seed=0, test_size=2)
    assert "--labels has no meaning" in error(
        train_file=train, test_file=test, seed=0, target_column="label", labels="a,b"
    )
    assert "must differ" in error(train_file=train, test_file=test, seed=0, label_column="text")
    assert "names a class twice" in error(train_file=train, test_file=test, seed=0, labels="a,a")
    assert "--validation-size" in error(
        train_file=train, test_file=test, seed=0, validation_size=-1
    )
    message = error(train_file=train, seed=0, labels="neg,pos", test_size=5, validation_size=3)
    assert "leave no training record" in message


# --------------------------------------------------------------------------- privacy of outputs


def _numbers(text: str, *paths: Path) -> set[str]:
    for path in paths:
        text = text.replace(str(path), "")
    return set(re.findall(r"\d+", text))


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(30, 80),
    rare=st.text(alphabet="qxzjkw", min_size=5, max_size=8),
    position=st.integers(0, 29),
    seed=st.integers(0, 1000),
)
def test_errors_never_state_the_training_count_nor_quote_the_rare_label(n, rare, position, seed):
    """A rare label planted in a random training file: no message or output reveals it or n."""
    labels = (["neg", "pos"] * n)[:n]
    labels[position] = rare
    texts = [f"review {i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        train = write(Path(folder) / "train.csv", {"text": texts, "label": labels})
        test = write(Path(folder) / "test.csv", TEST)
        for kwargs in (
            {"test_file": test},
            {"test_file": test, "labels": "neg,pos"},
            {"labels": "neg,pos", "test_size": 5},
            {"test_file": test, "validation_size": n},  # too large: the size error
        ):
            with pytest.raises(SetupError) as info:
                load_user_data(train, seed=seed, **kwargs)
            message = str(info.value)
            assert rare not in message and "review" not in message
            assert str(n) not in _numbers(message, train, test) - {
                str(kwargs.get("validation_size"))
            }
            assert str(n - 1) not in _numbers(message, train, test)


def test_loading_prints_nothing_and_restores_datasets_settings(files, capfd):
    datasets.enable_progress_bars()
    data = load_user_data(*files, seed=0)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no "Generating train split: 8 examples"
    assert not datasets.are_progress_bars_disabled()
    shown = repr(data)
    for path in (*files, files[0].parent):  # pytest's folder name has digits of its own
        shown = shown.replace(str(path), "")
    assert "good film" not in shown and "8" not in shown
    assert str(len(TRAIN["text"])) not in _numbers(json.dumps(data.public_summary), *files)


def test_no_copy_of_the_private_file_is_left_behind(files, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    load_user_data(*files, seed=0)
    assert list(scratch.iterdir()) == []
    kept = tmp_path / "cache"
    load_user_data(*files, seed=0, cache_dir=kept)
    assert any(kept.rglob("*.arrow"))  # an explicit cache_dir is the caller's to keep


# --------------------------------------------------------------------------- the debates task


def test_debates_task_is_prepared_and_loads(tmp_path, capsys):
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext (the debates' source) is not installed")
    from benchmarks import debates

    assert debates.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "101 statements" in printed and "Democratic 41, Republican 60" in printed
    data = load_user_data(tmp_path / "train.csv", tmp_path / "test.csv", seed=0)
    assert data.label_names == ("Democratic", "Republican")
    assert data.public_summary["test"]["class_counts"] == {"Democratic": 41, "Republican": 60}
    # moderators left out, split by debate: no statement of the test debate in the training file
    assert str(len(data.train_texts)) not in printed
    assert not any("(APPLAUSE)" in t or "(CROSSTALK)" in t for t in data.train_texts)
    rows = debates.read_statements(debates.source_file())
    assert {r["label"] for r in rows} == {"Democratic", "Republican"}
    assert len(rows) == 802  # 1,122 statements less the 320 of the moderators
    assert data.test_texts == [r["text"] for r in rows if r["debate"] == "3rd"]
    assert data.train_texts == [r["text"] for r in rows if r["debate"] != "3rd"]

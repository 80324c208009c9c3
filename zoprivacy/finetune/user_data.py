"""The user's own data files for the ``zoprivacy finetune`` job: ``--train-file``, ``--test-file``.

:func:`load_user_data` reads a CSV, JSON Lines or Parquet file (chosen by suffix, see
:data:`FORMATS`) with Hugging Face ``datasets`` (``load_dataset("csv" | "json" | "parquet",
data_files=...)``: local files only, nothing is downloaded, parsed into memory-mapped Arrow tables)
and returns a :class:`UserData`, the :class:`~zoprivacy.finetune._setup.TaskData` shape the job
uses for the packaged tasks, with text pairs (NLI-style data) and generation targets added.

Privacy policy (issue 15). The training file is the private data set that DP-AggZO protects
(Algorithm 1 of Bao et al. 2025 samples its records by Poisson sampling, line 5); the test file is
public.

* The label set is released with the model (head size, label names), so it must be public:
  ``labels`` when given, or by default the sorted distinct labels of the PUBLIC test file; never
  taken from the private training file, where one rare label would reveal that its record exists.
* With no test file, a held-out test split is carved from the training file by the public seed
  (:func:`carve`); ``labels`` is then required, and :attr:`UserData.test_is_private` says that
  this split's accuracy is computed on private data and is not covered by the guarantee. The
  validation part (``validation_size``) is always carved from the training file, so its metrics
  are private too (:attr:`UserData.private_parts`).
* The number of training records and the class counts of the training file are private (the job
  releases the count once, with Laplace noise). No error message, log line or field of
  :attr:`UserData.public_summary` states them, and no message quotes a training record's label or
  text. ``datasets``' progress bars ("Generating train split: N examples") and log lines are
  silenced while a file is read. Test-file statistics are public.
* Every problem is a :class:`~zoprivacy.finetune._setup.SetupError` naming the file and the
  problem, raised while loading, i.e. before any privacy budget could be spent.

Labels are strings or integers (one kind in both files). String labels are matched by name.
Integer labels are matched by value against label names that are all integers (the default, where
the names are the test file's distinct integers, so ``0, 1`` become ``"0", "1"``); when ``labels``
names the classes with words, integer labels are class indices into it (``0`` -> ``labels[0]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from zoprivacy import checks
from zoprivacy.finetune._setup import SetupError, TaskData

__all__ = ["FORMATS", "UserData", "carve", "load_user_data"]

#: File suffix -> the ``datasets`` builder that reads it (JSON Lines: one object per line).
FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

_TRAIN, _TEST = "--train-file", "--test-file"
_FLAGS = {
    "text": "--text-column",
    "label": "--label-column",
    "text_pair": "--text-pair-column",
    "target": "--target-column",
}
_INTEGER_NAME = re.compile(r"[+-]?\d+")


@dataclasses.dataclass(repr=False)
class UserData(TaskData):
    """The parts of the user's files, in the job's :class:`TaskData` shape.

    ``train_*`` come from the training file (private); ``validation_*`` are carved from it by the
    public seed (private too); ``test_*`` are the test file (public) or, with no test file, a part
    carved from the training file (:attr:`test_is_private`). For a generation target
    (``target_column``) there is no label set: ``label_names`` is ``()`` and the label lists are
    empty; the ``*_targets`` lists hold the completions. ``indices`` gives each part's row numbers
    in its file (for ``train`` and ``validation`` they are private: they reveal the file's size).
    """

    train_pairs: list[str] | None = None
    validation_pairs: list[str] | None = None
    test_pairs: list[str] | None = None
    train_targets: list[str] | None = None
    validation_targets: list[str] | None = None
    test_targets: list[str] | None = None
    #: True when the test part was carved from the private training file (no test file): its
    #: accuracy is computed on private data and is not covered by the guarantee.
    test_is_private: bool = False
    #: Where the label set came from: ``"--labels"``, ``"--test-file"``, or ``""`` (generation).
    label_source: str = ""
    #: What may be reported: files, columns, label set, seed, sizes asked for, and the test file's
    #: statistics when it is a public file. Never the training file's count or class counts.
    public_summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_generation(self) -> bool:
        """Whether the task is a generation target (causal LM completions), not classification."""
        return self.train_targets is not None

    def __repr__(self) -> str:
        """The public summary only: the training records must not reach a log by a repr."""
        return f"UserData(name={self.name!r}, public_summary={self.public_summary!r})"

    @property
    def private_parts(self) -> tuple[str, ...]:
        """The evaluated parts whose metrics are computed on private data (not covered)."""
        parts = ("validation",) if self.validation_texts else ()
        return parts + (("test",) if self.test_is_private else ())


class _File(NamedTuple):
    """A data file and the option that named it (``--train-file`` is the private one)."""

    path: Path
    role: str

    @property
    def private(self) -> bool:
        return self.role == _TRAIN

    def __str__(self) -> str:
        return f"{self.role} {self.path}"


class _Records(NamedTuple):
    """One file's columns, checked: texts, optional pairs/targets, raw labels and their kind."""

    texts: list[str]
    pairs: list[str] | None
    targets: list[str] | None
    labels: list[Any] | None
    kind: str  # "int", "str", or "" (generation)


@dataclasses.dataclass(frozen=True)
class _Options:
    columns: dict[str, str]  # role ("text", "label", "text_pair", "target") -> column name
    labels: tuple[str, ...] | None
    seed: int
    validation_size: int
    test_size: int | None

    @property
    def generation(self) -> bool:
        return "target" in self.columns


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------


def load_user_data(
    train_file: str | os.PathLike[str],
    test_file: str | os.PathLike[str] | None = None,
    *,
    seed: int,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    target_column: str | None = None,
    labels: Sequence[str] | str | None = None,
    validation_size: int = 0,
    test_size: int | None = None,
    name: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> UserData:
    """Load, check and split the user's files (see the module docstring for the privacy policy).

    Args:
        train_file: the private training file (``.csv``, ``.jsonl``/``.json``, ``.parquet``).
        test_file: the public test file, same format rules; ``None`` carves a test part from the
            training file by ``seed`` (then ``labels`` and ``test_size`` are required).
        seed: the public seed of the carved parts (:func:`carve`).
        text_column, label_column, text_pair_column: the input text, the label (strings or
            integers) and the optional second text of a pair (NLI-style data).
        target_column: a generation target (completions for a causal LM); then there is no label
            set, and ``label_column`` is not read.
        labels: the public, ordered label set (a sequence or a comma-separated string); default:
            the sorted distinct labels of the test file.
        validation_size: records carved from the training file for model selection.
        test_size: records carved from the training file as the test part (only without a test
            file).
        name: the task's name in reports (default: the training file's name).
        cache_dir: where ``datasets`` writes its Arrow copy of the files; default: a private
            temporary folder removed after loading (no copy of the private data is left behind).

    Raises:
        SetupError: a bad option, a missing file, an unknown suffix, an unreadable or empty file,
            a missing column (the message lists the columns present), a value that is not text, a
            missing, non-integer or mixed integer/string label, a label outside the label set, a
            label set with fewer than two classes, sizes that leave no training record. Messages
            about the training file never quote its values nor state its size.
    """
    opts = _options(
        seed, text_column, label_column, text_pair_column, target_column, labels, validation_size
    )
    opts = dataclasses.replace(opts, test_size=_test_size(test_size, test_file, opts))
    train = _File(_check_path(train_file, _TRAIN), _TRAIN)
    test = None if test_file is None else _File(_check_path(test_file, _TEST), _TEST)
    with _quiet_datasets(cache_dir) as load:
        train_records = _records(load(train, opts.columns), train, opts)
        test_records = None if test is None else _records(load(test, opts.columns), test, opts)
    names, source = _label_set(opts, train_records, test_records, test)
    return _assemble(name, train, test, train_records, test_records, names, source, opts)


# ---------------------------------------------------------------------------------------------
# options and paths (checked before any file is read)
# ---------------------------------------------------------------------------------------------


def _options(
    seed: Any,
    text_column: Any,
    label_column: Any,
    text_pair_column: Any,
    target_column: Any,
    labels: Any,
    validation_size: Any,
) -> _Options:
    """Check the options; a wrong value is a SetupError naming the option and the fix."""
    given = {"text": text_column, "text_pair": text_pair_column, "target": target_column}
    if target_column is None:
        given["label"] = label_column
    columns = {role: col for role, col in given.items() if col is not None}
    for role, col in columns.items():
        if not isinstance(col, str) or not col:
            raise SetupError(f"{_FLAGS[role]} must be a non-empty column name, got {col!r}")
    if len(set(columns.values())) < len(columns):
        named = ", ".join(f"{_FLAGS[r]} {c!r}" for r, c in columns.items())
        raise SetupError(f"the columns must differ, got {named}")
    if target_column is not None and labels is not None:
        raise SetupError("--labels has no meaning with --target-column (generation): drop one")
    return _Options(
        columns,
        None if labels is None else _check_labels(labels),
        _integer("--seed", seed, minimum=-(2**63)),
        _integer("--validation-size", validation_size),
        None,
    )


def _integer(flag: str, value: Any, *, minimum: int = 0) -> int:
    try:
        return checks.integer(flag, value, minimum=minimum)
    except (TypeError, ValueError) as exc:
        raise SetupError(str(exc)) from None


def _check_labels(labels: Sequence[str] | str) -> tuple[str, ...]:
    """``labels`` as a tuple of at least two distinct non-empty names."""
    names = labels.split(",") if isinstance(labels, str) else list(labels)
    names = [n.strip() if isinstance(n, str) else n for n in names]
    if not all(isinstance(n, str) and n for n in names):
        raise SetupError(f"--labels must be non-empty names (e.g. neg,pos), got {labels!r}")
    if len(set(names)) < len(names):
        raise SetupError(f"--labels names a class twice: {labels!r}")
    if len(names) < 2:
        raise SetupError(f"--labels needs at least two classes, got {labels!r}")
    return tuple(names)


def _test_size(test_size: Any, test_file: Any, opts: _Options) -> int | None:
    """``test_size`` is the carved test part: required without a test file, refused with one."""
    if test_file is not None:
        if test_size is not None:
            raise SetupError(
                "--test-size carves a test part from --train-file; with --test-file that file is "
                "the test part: drop --test-size"
            )
        return None
    if test_size is None:
        raise SetupError("with no --test-file, give --test-size: the records carved as test part")
    if opts.labels is None and not opts.generation:
        raise SetupError(
            "with no --test-file, give --labels: the label set is released with the model, so it "
            "must be public and is never taken from the private training file"
        )
    return _integer("--test-size", test_size, minimum=1)


def _check_path(path: str | os.PathLike[str], role: str) -> Path:
    """An existing file with a known suffix (:data:`FORMATS`)."""
    try:
        resolved = Path(path)
    except TypeError:
        raise SetupError(f"{role} must be a path, got {path!r}") from None
    if resolved.suffix.lower() not in FORMATS:
        raise SetupError(
            f"{role} {resolved}: unknown suffix {resolved.suffix!r}; use a CSV (.csv), "
            "JSON Lines (.jsonl or .json) or Parquet (.parquet) file"
        )
    if not resolved.is_file():
        raise SetupError(f"{role} {resolved}: no such file")
    return resolved


# ---------------------------------------------------------------------------------------------
# reading a file with datasets, silently
# ---------------------------------------------------------------------------------------------

_Loader = Callable[[_File, dict[str, str]], dict[str, list[Any]]]


@contextlib.contextmanager
def _quiet_datasets(cache_dir: str | os.PathLike[str] | None) -> Iterator[_Loader]:
    """A file reader with ``datasets``' progress bars, logs and warnings off (they state counts)."""
    try:
        import datasets
    except ImportError:
        raise SetupError(
            "--train-file needs the package datasets; install it with: "
            "pip install 'zoprivacy[hf]' (or pip install datasets)"
        ) from None
    bars_off = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if cache_dir is None:
        where: contextlib.AbstractContextManager[str] = tempfile.TemporaryDirectory(
            prefix="zoprivacy-data-"
        )
    else:
        where = contextlib.nullcontext(os.fspath(cache_dir))
    try:
        with where as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield lambda file, columns: _read(datasets, folder, file, columns)
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_off:
            datasets.enable_progress_bars()


def _read(datasets: Any, folder: str, file: _File, columns: dict[str, str]) -> dict[str, list]:
    """The named columns of ``file`` as lists (role -> values); empty / missing column refused."""
    builder = FORMATS[file.path.suffix.lower()]
    if file.path.stat().st_size == 0:
        raise SetupError(f"{file}: the file is empty (no records)")
    try:
        table = datasets.load_dataset(
            builder, data_files={"data": str(file.path)}, split="data", cache_dir=folder
        )
    except Exception as exc:  # the parsers raise many types; all mean "cannot read this file"
        if "corresponds to no data" in str(exc):
            raise SetupError(f"{file}: the file is empty (no records)") from None
        why = (
            "the parser's message is withheld: it can quote private records"
            if file.private
            else f"{type(exc).__name__}: {exc}"
        )
        raise SetupError(f"{file}: cannot be read as {builder.upper()} ({why})") from None
    if len(table) == 0:
        raise SetupError(f"{file}: the file is empty (no records)")
    for role, column in columns.items():
        if column not in table.column_names:
            raise SetupError(
                f"{file}: no column {column!r} ({_FLAGS[role]}); its columns are "
                f"{', '.join(map(repr, table.column_names))}"
            )
    return {role: list(table[column]) for role, column in columns.items()}


# ---------------------------------------------------------------------------------------------
# checking values (never quoting a training record)
# ---------------------------------------------------------------------------------------------


def _records(values: dict[str, list[Any]], file: _File, opts: _Options) -> _Records:
    """Check one file's columns: texts are strings, labels one kind of string or integer."""
    texts = {
        role: _texts(values[role], file, role, opts.columns[role])
        for role in ("text", "text_pair", "target")
        if role in values
    }
    labels, kind = (None, "") if opts.generation else _raw_labels(values["label"], file, opts)
    return _Records(texts["text"], texts.get("text_pair"), texts.get("target"), labels, kind)


def _texts(values: list[Any], file: _File, role: str, column: str) -> list[str]:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            what = (
                "a value that is not text (a number, a list or an empty cell) in a training "
                "record; training records are private, so it is not shown"
                if file.private
                else f"{value!r}, not text, in record {i + 1}"
            )
            raise SetupError(f"{file}: column {column!r} ({_FLAGS[role]}) holds {what}")
    return values


def _label_kind(value: Any) -> str:
    if isinstance(value, str):
        return "str"
    if isinstance(value, int) and not isinstance(value, bool):
        return "int"
    return "missing" if value is None else "other"


def _raw_labels(values: list[Any], file: _File, opts: _Options) -> tuple[list[Any], str]:
    """The label column, all strings or all integers; a missing or other value is refused."""
    column = f"column {opts.columns['label']!r} (--label-column)"
    kinds = [_label_kind(v) for v in values]
    for bad in ("missing", "other"):
        if bad in kinds:
            i = kinds.index(bad)
            what = "a missing label" if bad == "missing" else "a label that is not a string or int"
            where = "a training record" if file.private else f"record {i + 1} ({values[i]!r})"
            raise SetupError(f"{file}: {column} has {what} in {where}")
    if len(set(kinds)) > 1:
        raise SetupError(f"{file}: {column} mixes integer and string labels; use one kind")
    return values, kinds[0]


# ---------------------------------------------------------------------------------------------
# the public label set and the label indices
# ---------------------------------------------------------------------------------------------


def _label_set(
    opts: _Options, train: _Records, test: _Records | None, test_file: _File | None
) -> tuple[tuple[str, ...], str]:
    """The public label set: ``labels``, else the test file's sorted distinct labels."""
    if opts.generation:
        return (), ""
    if test is not None and test.kind != train.kind:
        raise SetupError(
            f"{_TRAIN} has {train.kind} labels but {_TEST} has {test.kind} labels: use one kind "
            "(integer and string labels cannot be mixed)"
        )
    if opts.labels is not None:
        return opts.labels, "--labels"
    assert test is not None and test_file is not None  # _test_size requires labels otherwise
    names = tuple(str(v) for v in sorted(set(test.labels)))
    if len(names) < 2:
        raise SetupError(
            f"{test_file}: every record has the label {names[0]!r}; a classifier needs at least "
            "two classes: give --labels, or a test file with two or more"
        )
    return names, "--test-file"


def _label_index(names: tuple[str, ...], kind: str) -> dict[Any, int]:
    """Raw label -> class index (see the module docstring for integer labels)."""
    if kind == "int":
        if all(_INTEGER_NAME.fullmatch(n) for n in names):
            return {int(n): i for i, n in enumerate(names)}
        return {i: i for i in range(len(names))}
    return {n: i for i, n in enumerate(names)}


def _encode(records: _Records, names: tuple[str, ...], source: str, file: _File) -> list[int]:
    index = _label_index(names, records.kind)
    outside = "--labels" if source == "--labels" else "the label set of --test-file"
    for i, value in enumerate(records.labels or ()):
        if value not in index:
            if file.private:
                raise SetupError(
                    f"{file}: a training record has a label outside {outside} "
                    f"({', '.join(names)}); training labels are private, so it is not shown"
                )
            raise SetupError(
                f"{file}: record {i + 1} has the label {value!r}, outside {outside} "
                f"({', '.join(names)})"
            )
    return [index[v] for v in records.labels or ()]


# ---------------------------------------------------------------------------------------------
# carving held-out parts from the private file by the public seed
# ---------------------------------------------------------------------------------------------


def _rank_key(record: Sequence[Any], key: bytes) -> bytes:
    text = json.dumps(list(record), ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(
        text.encode(), digest_size=16, key=key, person=b"zoprivacy-carve"
    ).digest()


def carve(
    records: Sequence[Sequence[Any]], *, seed: int, test_size: int = 0, validation_size: int = 0
) -> dict[str, list[int]]:
    """Held-out parts of a private file, chosen by the public seed only (sorted row indices).

    Each record gets a rank, the keyed BLAKE2b hash of its own fields under ``seed``; the
    ``test_size`` lowest ranks are the test part, the next ``validation_size`` the validation
    part, the rest the training part (ties, i.e. identical records, in file order). So the parts'
    contents are a function of the seed and of the multiset of records only, not of the file's
    order, and adding or removing one record of the file adds or removes exactly one record of
    the training part (that one, or the one it displaces from a held-out part): neighbouring files
    give neighbouring training parts, the add/remove relation DP-AggZO's guarantee is stated for.

    Raises:
        ValueError: sizes that are negative or leave no training record.
    """
    test_size = checks.integer("test_size", test_size)
    validation_size = checks.integer("validation_size", validation_size)
    if test_size + validation_size >= len(records):
        raise ValueError(
            f"test_size {test_size} + validation_size {validation_size} leave no training record"
        )
    key = str(checks.integer("seed", seed, minimum=-(2**63))).encode()
    order = sorted(range(len(records)), key=lambda i: (_rank_key(records[i], key), i))
    held = test_size + validation_size
    return {
        "train": sorted(order[held:]),
        "validation": sorted(order[test_size:held]),
        "test": sorted(order[:test_size]),
    }


# ---------------------------------------------------------------------------------------------
# assembling the parts
# ---------------------------------------------------------------------------------------------


def _rows(records: _Records) -> list[tuple[Any, ...]]:
    fields = (records.texts, records.pairs, records.targets, records.labels)
    return list(zip(*(f for f in fields if f is not None), strict=True))


def _pick(values: list[Any] | None, indices: list[int]) -> list[Any] | None:
    return None if values is None else [values[i] for i in indices]


def _assemble(
    name: str | None,
    train: _File,
    test: _File | None,
    train_records: _Records,
    test_records: _Records | None,
    names: tuple[str, ...],
    source: str,
    opts: _Options,
) -> UserData:
    """Encode the labels, carve the held-out parts and build the :class:`UserData`."""
    train_labels = [] if opts.generation else _encode(train_records, names, source, train)
    held = (opts.test_size or 0) + opts.validation_size
    rows = _rows(train_records)
    if held >= len(rows):
        raise SetupError(
            f"{train}: --test-size {opts.test_size or 0} + --validation-size "
            f"{opts.validation_size} leave no training record: lower them"
        )
    parts = carve(
        rows, seed=opts.seed, test_size=opts.test_size or 0, validation_size=opts.validation_size
    )
    if test is None or test_records is None:
        held_out, held_labels, test_idx = train_records, train_labels, parts["test"]
    else:
        test_labels = [] if opts.generation else _encode(test_records, names, source, test)
        held_out, held_labels, test_idx = (
            test_records,
            test_labels,
            list(range(len(test_records.texts))),
        )
    tr, va = parts["train"], parts["validation"]
    return UserData(
        name=name or train.path.name,
        label_names=names,
        train_texts=_pick(train_records.texts, tr),
        train_labels=_pick(train_labels, tr) if train_labels else [],
        test_texts=_pick(held_out.texts, test_idx),
        test_labels=_pick(held_labels, test_idx) if held_labels else [],
        validation_texts=_pick(train_records.texts, va),
        validation_labels=_pick(train_labels, va) if train_labels else [],
        indices={"train": tr, "validation": va, "test": test_idx},
        train_pairs=_pick(train_records.pairs, tr),
        validation_pairs=_pick(train_records.pairs, va),
        test_pairs=_pick(held_out.pairs, test_idx),
        train_targets=_pick(train_records.targets, tr),
        validation_targets=_pick(train_records.targets, va),
        test_targets=_pick(held_out.targets, test_idx),
        test_is_private=test is None,
        label_source=source,
        public_summary=_summary(train, test, test_records, names, source, opts),
    )


def _summary(
    train: _File,
    test: _File | None,
    test_records: _Records | None,
    names: tuple[str, ...],
    source: str,
    opts: _Options,
) -> dict[str, Any]:
    """What may be reported: options, the label set and the public test file's statistics."""
    if test is None or test_records is None:
        held: dict[str, Any] = {
            "source": "carved from --train-file by --seed",
            "records": opts.test_size,
            "covered_by_guarantee": False,
        }
    else:
        held = {"source": "--test-file", "records": len(test_records.texts)}
        if not opts.generation:
            index = _label_index(names, test_records.kind)
            counts = Counter(index[v] for v in test_records.labels or ())
            held["class_counts"] = {n: counts.get(i, 0) for i, n in enumerate(names)}
    return {
        "train_file": str(train.path),
        "test_file": None if test is None else str(test.path),
        "columns": {_FLAGS[role]: column for role, column in opts.columns.items()},
        "label_names": list(names),
        "label_source": source,
        "seed": opts.seed,
        "validation_records": opts.validation_size,
        "validation_covered_by_guarantee": False,
        "test": held,
    }

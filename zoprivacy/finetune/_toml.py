"""``zoprivacy finetune --config run.toml``: the job's options from a TOML file.

The keys are the options' names, spelt as the flags without the leading dashes
(``train-file``) or with underscores (``train_file``); a switch is a boolean (``no-cache =
true``), ``stage`` a list of strings. The command line overrides the file (the caller merges);
report.json records the effective configuration. Read with the standard library's ``tomllib``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._options import OPTIONS
from ._setup import SetupError

__all__ = ["read_config"]

#: TOML key (flag without dashes, or the option's name) -> the option.
_KEYS = {o.cli[2:]: o for o in OPTIONS} | {o.name: o for o in OPTIONS}


def _value(path: Path, key: str, value: Any) -> tuple[str, Any]:
    """The option's name and value (switches: ``given_options``' form, the value set)."""
    option = _KEYS[key]
    if option.name == "config":
        raise SetupError(f"--config {path}: a config file cannot name another (key {key!r})")
    if option.switch:
        if not isinstance(value, bool):
            raise SetupError(f"--config {path}: {key} must be true or false, got {value!r}")
        return option.name, (not option.default) if value else None
    if option.name == "stages":
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise SetupError(f"--config {path}: stage must be a string or a list of strings")
        return option.name, items
    want = option.argparse.get("type", option.type)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is str and isinstance(value, list) and option.name in ("labels", "label_words"):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
        raise SetupError(
            f"--config {path}: {key} must be a {want.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return option.name, value


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options of a TOML file, by option name (a ``None`` value: a switch left off).

    Raises:
        SetupError: a missing or malformed file, an unknown key (the message lists the
            known ones), a value of the wrong type.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser as the tomli package
        try:
            import tomli as tomllib
        except ImportError:
            raise SetupError(
                "--config needs Python >= 3.11 (tomllib) or: pip install tomli"
            ) from None
    file = Path(path)
    try:
        with file.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise SetupError(f"--config {file}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SetupError(f"--config {file}: not valid TOML ({exc})") from None
    options: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KEYS:
            known = ", ".join(sorted(o.cli[2:] for o in OPTIONS))
            raise SetupError(f"--config {file}: unknown option {key!r}; known: {known}")
        name, parsed = _value(file, key, value)
        if parsed is not None:
            options[name] = parsed
    return options

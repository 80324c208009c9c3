"""The job's data and model, packaged or the user's own, and its Hugging Face output folder.

:func:`load_data` reads the packaged task (``--task``) or the user's files (``--train-file``,
``--test-file``, through :func:`~zoprivacy.finetune.user_data.load_user_data`): every bad file or
option fails here, before the model is loaded and before any privacy budget is spent.
:func:`load_job_model` loads ``--model`` through the one path (:func:`load_classifier`: packaged
presets and folders alike). :func:`write_model_folder` writes ``OUTPUT/model``: a folder that
``from_pretrained`` loads (full or partial fine-tuning) or a PEFT adapter folder (``lora``), with
a Hugging Face model card stating the guarantee (:mod:`zoprivacy.finetune.export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import export
from ._setup import Classifier, TaskData, load_classifier, load_task

__all__ = ["MODEL_DIR", "covered_records", "load_data", "load_job_model", "write_model_folder"]

#: The Hugging Face folder (or PEFT adapter folder) inside ``--output``.
MODEL_DIR = "model"


def _words(value: str | None) -> tuple[str, ...] | None:
    """``--label-words`` as a tuple: comma-separated, each word stripped and given one leading
    space (as the default label words ``" " + label``: the word follows the prompt's last
    token, and BPE tokenizers fold that space into the word's one token)."""
    if value is None:
        return None
    return tuple(" " + w.strip() for w in str(value).split(","))


def load_data(cfg: Any) -> TaskData:
    """The packaged task or the user's files (public split by ``--seed``)."""
    if cfg.train_file is None:
        return load_task(
            cfg.task,
            per_class_train=cfg.train_per_class,
            test_size=cfg.test_size,
            validation_size=cfg.validation_size,
            seed=cfg.seed,
        )
    from .user_data import load_user_data

    return load_user_data(
        cfg.train_file,
        cfg.test_file,
        seed=cfg.seed,
        text_column=cfg.text_column,
        label_column=cfg.label_column or "label",
        text_pair_column=cfg.text_pair_column,
        target_column=cfg.target_column,
        labels=cfg.labels,
        validation_size=cfg.validation_size,
        test_size=cfg.test_size,
    )


def load_job_model(cfg: Any, data: TaskData) -> Classifier:
    """``--model`` for ``data`` with ``--trainable``, ``--model-kind``, ``--dtype``, ``--device``,
    ``--prompt`` and ``--label-words``."""
    return load_classifier(
        cfg.model,
        data,
        trainable=cfg.trainable,
        max_length=cfg.max_length,
        seed=cfg.seed,
        kind=cfg.model_kind,
        dtype=cfg.dtype,
        device=cfg.device,
        prompt=cfg.prompt,
        label_words=_words(cfg.label_words),
    )


def task_name(cfg: Any) -> str:
    """The data's name in messages: the packaged task or the training file's name."""
    return cfg.task if cfg.train_file is None else Path(cfg.train_file).name


def test_is_private(data: TaskData) -> bool:
    """The test part was carved from the private training file (no ``--test-file``)."""
    return bool(getattr(data, "test_is_private", False))


def covered_records(cfg: Any, data: TaskData) -> list[str]:
    """The model card's "what is covered" items about the training records."""
    if cfg.train_file is None:
        covered = [
            f"every record of the training split ({cfg.train_per_class} per class at most, "
            f"drawn with the public seed {cfg.seed} from the packaged {cfg.task} data);"
        ]
    else:
        covered = [
            f"every record of the training file {task_name(cfg)} that is not in a held-out part "
            f"(the held-out parts are chosen by the public seed {cfg.seed});"
        ]
    if data.validation_texts:
        covered.append(
            f"not the {len(data.validation_texts)} validation records (excluded from "
            "training): their metrics in report.json are released without privacy;"
        )
    if test_is_private(data):
        covered.append(
            f"not the {len(data.test_texts)} test records carved from the training file (no "
            "--test-file): the test metrics in report.json are computed on this private data "
            "without noise and are NOT covered by the guarantee;"
        )
    return covered


def write_model_folder(
    cfg: Any, root: Path, classifier: Classifier, report: dict[str, Any], data: TaskData
) -> Path:
    """``OUTPUT/model``: ``save_pretrained``'s folder or a PEFT adapter, and the HF card."""
    metrics = {k: v for k, v in report.get("test_metrics_after", {}).items() if v is not None}
    adapter = export.is_adapter(classifier.model)
    card = export.model_card(
        base_model=str(cfg.model),
        kind=classifier.kind,
        method=cfg.method,
        trainable=cfg.trainable,
        epsilon=report["epsilon_spent"] if report["private"] else None,
        delta=cfg.delta if report["private"] else None,
        steps=report["steps"],
        sample_rate=report.get("sample_rate"),
        noise_multiplier=report.get("noise_multiplier"),
        clip_norm=report.get("clip_norm"),
        adapter=adapter,
        label_names=classifier.label_names or None,
        prompt=classifier.loaded.prompt,
        label_words=classifier.label_words or None,
        metrics={f"test {k}": v for k, v in metrics.items()},
        held_out_private=test_is_private(data),
    )
    task = {
        "kind": classifier.kind,
        "generation": classifier.generation,
        "label_names": list(classifier.label_names),
        "prompt": classifier.loaded.prompt,
        "label_words": list(classifier.label_words),
        "max_length": cfg.max_length,
    }
    from .user_model import _quiet_transformers

    with _quiet_transformers():  # no "Writing model shards" bar
        return export.save_hf_model(
            classifier.model, classifier.tokenizer, root / MODEL_DIR, card=card, task=task,
            overwrite=True,
        )  # fmt: skip

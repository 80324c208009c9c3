"""Any Hugging Face model folder as a classifier or a prompt-based causal LM, and what trains.

:func:`load_model` turns ``--model`` into a :class:`LoadedModel`: a packaged name (``minilm``,
``smollm2``: presets loaded by :mod:`zoprivacy.tasks.packaged`) or a local folder written by
``save_pretrained`` (never downloaded: ``local_files_only``). Its kind comes from the config,
through transformers' own auto-model tables (no hard-coded list of families):

* ``"classifier"``: ``AutoModelForSequenceClassification``; the head is built fresh (inside a
  forked RNG seeded by the public ``seed``) when the folder has none;
* ``"causal"``: ``AutoModelForCausalLM``, trained prompt-based with label words (the prompt's
  ``{text}`` is filled with the record and the next-token logits of the label words are the
  class logits, as :func:`zoprivacy.tasks.prompt_classification_losses` computes), or on
  generation targets (no label words).

:func:`select_trainable` marks the trained tensors: ``classifier``, ``head``, ``lastN``, ``all``
(the job's historical values), ``bias`` (BitFit: the bias terms) and ``lora`` (PEFT low-rank
adapters), joined with ``+``. Only these tensors are perturbed by DP-AggZO (Algorithm 1 line 16
updates θ, the trainable parameters); everything else stays bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoprivacy import tasks
from zoprivacy.finetune._setup import SetupError, _packaged_call
from zoprivacy.tasks import packaged
from zoprivacy.tasks.prefix import find_embeddings, find_layers

__all__ = [
    "DEFAULT_PROMPT",
    "KINDS",
    "LoadedModel",
    "LoraOptions",
    "Selection",
    "detect_kind",
    "load_model",
    "lora_default_targets",
    "parse_trainable_spec",
    "resolve_device",
    "resolve_dtype",
    "select_trainable",
]

KINDS = ("classifier", "causal")
PACKAGED = ("minilm", "smollm2")
#: Prompt of a causal LM when ``--prompt`` is not given (label words follow "Label:").
DEFAULT_PROMPT = "Text: {text}\nLabel:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the job (eval mode, on its device, pad token set).

    Attributes:
        model: the Hugging Face model (``PeftModel`` after a ``lora`` selection is applied by
            :func:`select_trainable`, which returns it in :attr:`Selection.model`).
        tokenizer: its tokenizer (``pad_token`` = ``eos_token`` when it had none; padding side
            as the tokenizer was saved).
        kind: ``"classifier"`` or ``"causal"``.
        source: what ``--model`` said (a packaged name or the folder).
        model_type: the config's ``model_type`` (``bert``, ``gpt2``, ...).
        label_names: the public label set (``None`` for a generation target).
        fresh_modules: names of the modules initialised here (seeded) because the folder had no
            weights for them, e.g. ``("classifier", "bert.pooler")``.
        prompt: the causal LM's prompt, with a ``{text}`` placeholder.
        label_words: the causal LM's label words, one token each.
        label_word_ids: their vocabulary ids.
    """

    model: nn.Module
    tokenizer: Any
    kind: str
    source: str
    model_type: str
    label_names: tuple[str, ...] | None = None
    fresh_modules: tuple[str, ...] = ()
    prompt: str | None = None
    label_words: tuple[str, ...] | None = None
    label_word_ids: list[int] | None = None

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    @property
    def template(self) -> str | None:
        """The prompt in :func:`zoprivacy.tasks.encode_prompts`' form (``{s}``, braces escaped)."""
        if self.prompt is None:
            return None
        return self.prompt.replace("{", "{{").replace("}", "}}").replace("{{text}}", "{s}")


# ---------------------------------------------------------------------------------------------
# device, dtype, kind
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (``--device``)."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise SetupError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    resolved = torch.device(name)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"--device {device!r}: CUDA is not available here; use cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise SetupError(
                f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` (``--dtype``), or one of those torch dtypes."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in _DTYPES:
        return _DTYPES[dtype.strip().lower()]
    raise SetupError(f"--dtype {dtype!r}: use one of {', '.join(_DTYPES)}")


def _auto_tables() -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]:
    from transformers.models.auto import modeling_auto as auto

    return (
        auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )


def _names(table: Mapping[str, Any]) -> set[str]:
    out: set[str] = set()
    for value in table.values():
        out.update([value] if isinstance(value, str) else value)
    return out


def detect_kind(config: Any) -> str:
    """``"classifier"`` or ``"causal"`` from a transformers config.

    1. ``config.architectures`` (what ``save_pretrained`` recorded): a sequence-classification
       class means a classifier (with its head), a causal-LM class a causal LM.
    2. Else ``config.model_type`` in transformers' tables: a type with a causal-LM class and no
       masked-LM class (GPT-2, OPT, Llama, ...) is a causal LM; one with a sequence-classification
       class (BERT, RoBERTa, ... whose causal-LM class is only a decoder variant) a classifier.

    Raises:
        SetupError: neither applies; ``--model-kind`` then decides.
    """
    seq_cls, causal, masked = _auto_tables()
    archs = set(getattr(config, "architectures", None) or ())
    if archs & _names(seq_cls):
        return "classifier"
    if archs & _names(causal):
        return "causal"
    model_type = getattr(config, "model_type", None)
    if model_type in causal and model_type not in masked:
        return "causal"
    if model_type in seq_cls:
        return "classifier"
    raise SetupError(
        f"cannot tell whether model type {model_type!r} (architectures {sorted(archs)}) is a "
        "classifier or a causal LM: pass --model-kind classifier or --model-kind causal"
    )


def _has_classification_head(config: Any) -> bool:
    seq_cls, _, _ = _auto_tables()
    return bool(set(getattr(config, "architectures", None) or ()) & _names(seq_cls))


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def load_model(
    model: str | os.PathLike[str],
    *,
    kind: str | None = None,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    seed: int = 0,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    prompt: str | None = None,
    label_words: Sequence[str] | None = None,
) -> LoadedModel:
    """Load ``--model`` (a packaged name or a local Hugging Face folder) for the job.

    Args:
        model: ``minilm``, ``smollm2`` or a folder written by ``save_pretrained`` (nothing is
            downloaded).
        kind: ``"classifier"`` or ``"causal"`` (``--model-kind``); ``None``: :func:`detect_kind`.
        num_labels: the number of classes (with ``label_names`` unset: names ``"0"``, ``"1"``...).
        label_names: the public label set (``--labels`` or the public test file's labels).
        seed: the public seed of a fresh head's initialisation (a forked RNG: the global torch
            RNG is left untouched).
        dtype: parameter dtype (``--dtype``).
        device: ``--device`` (:func:`resolve_device`).
        prompt: causal LM only: the prompt with a ``{text}`` placeholder (default
            :data:`DEFAULT_PROMPT` when there are labels).
        label_words: causal LM only: one single-token word per label (default ``" " + name``
            when every label name is one word).

    Raises:
        SetupError: an unknown name or missing folder, an undetectable kind, a label set the
            model cannot take (head size, label words of several tokens), no pad token.
    """
    if kind is not None and kind not in KINDS:
        raise SetupError(f"--model-kind {kind!r}: use {' or '.join(KINDS)}")
    target, dtype = resolve_device(device), resolve_dtype(dtype)
    names = _label_names(num_labels, label_names)
    source = os.fspath(model)
    if source in PACKAGED:
        net, tok, kind, fresh = _load_packaged(source, kind, names, seed, dtype)
    else:
        net, tok, kind, fresh = _load_folder(_folder(source), kind, names, seed, dtype)
    _set_pad_token(net, tok, source)
    loaded = LoadedModel(net, tok, kind, source, str(net.config.model_type), names, fresh)
    if kind == "causal":
        _attach_label_words(loaded, prompt, label_words)
    elif prompt is not None or label_words is not None:
        raise SetupError("--prompt and --label-words apply to a causal LM (--model-kind causal)")
    net.to(target)
    net.eval()  # dropout off: zeroth-order differences need a deterministic loss
    return loaded


def _label_names(
    num_labels: int | None, label_names: Sequence[str] | None
) -> tuple[str, ...] | None:
    """The public label set (``None``: a generation target, no labels)."""
    if label_names is None:
        if num_labels is None:
            return None
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise SetupError(f"the number of labels must be an integer >= 2, got {num_labels!r}")
        return tuple(str(i) for i in range(num_labels))
    names = tuple(str(name) for name in label_names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise SetupError(f"--labels needs at least two distinct labels, got {list(names)}")
    if num_labels is not None and num_labels != len(names):
        raise SetupError(f"{len(names)} label names {list(names)} for num_labels={num_labels}")
    return names


def _folder(source: str) -> Path | str:
    """A local folder with a ``config.json``, or a Hub id already in the local Hugging Face
    cache (read with ``local_files_only``: nothing is downloaded)."""
    folder = Path(source).expanduser()
    if (folder / "config.json").is_file():
        return folder
    if not folder.exists():
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(source, local_files_only=True)
            return source
        except (OSError, ValueError):
            pass
    raise SetupError(
        f"--model {source!r} is neither a packaged model ({', '.join(PACKAGED)}) nor a "
        "local Hugging Face folder with a config.json (what save_pretrained writes); "
        "nothing is downloaded"
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' expected notices ("newly initialized", progress bars) silenced."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_packaged(
    name: str, kind: str | None, names: tuple[str, ...] | None, seed: int, dtype: torch.dtype
) -> tuple[nn.Module, Any, str, tuple[str, ...]]:
    """The packaged presets: MiniLM as a classifier (fresh seeded head), SmolLM2 as a causal LM."""
    preset = "classifier" if name == "minilm" else "causal"
    if kind not in (None, preset):
        raise SetupError(f"--model {name} is a {preset}; drop --model-kind {kind}")
    with _quiet_transformers():
        if name == "smollm2":
            net, tok = _packaged_call(packaged.load_smollm2, dtype=dtype)
            return net, tok, preset, ()
        if names is None:
            raise SetupError("a classifier needs the public label set: pass --labels")
        net, tok = _packaged_call(
            packaged.load_minilm_classifier, len(names), seed=seed, dtype=dtype
        )
    _name_labels(net.config, names)
    return net, tok, preset, ("classifier",)


def _name_labels(config: Any, names: Sequence[str]) -> None:
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}


def _load_folder(
    folder: Path | str,
    kind: str | None,
    names: tuple[str, ...] | None,
    seed: int,
    dtype: torch.dtype,
) -> tuple[nn.Module, Any, str, tuple[str, ...]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    kind = kind or detect_kind(config)
    with _quiet_transformers():
        if kind == "classifier":
            net, info = _load_classifier(folder, config, names, seed, dtype)
        else:
            net, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True, output_loading_info=True
            )
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    fresh = tuple(sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]}))
    if kind == "causal" and fresh:
        raise SetupError(
            f"{folder} has no weights for {list(fresh)[:4]}: a causal LM must come with its "
            "trained layers and LM head (or pass --model-kind classifier)"
        )
    return net, tok, kind, fresh


def _load_classifier(
    folder: Path | str,
    config: Any,
    names: tuple[str, ...] | None,
    seed: int,
    dtype: torch.dtype,
) -> tuple[nn.Module, dict[str, Any]]:
    """``AutoModelForSequenceClassification``; a missing head is drawn in a forked RNG seeded by
    the public ``seed`` (same seed, same head; the global RNG untouched)."""
    from transformers import AutoModelForSequenceClassification

    if names is None:
        raise SetupError("a classifier needs the public label set: pass --labels")
    if _has_classification_head(config) and config.num_labels != len(names):
        raise SetupError(
            f"{folder} has a classification head of {config.num_labels} labels but the label "
            f"set has {len(names)}: pass the head's labels or a folder without a head"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net, info = AutoModelForSequenceClassification.from_pretrained(
            folder,
            num_labels=len(names),
            dtype=dtype,
            local_files_only=True,
            output_loading_info=True,
        )
    _name_labels(net.config, names)
    return net, info


def _set_pad_token(net: nn.Module, tokenizer: Any, source: str) -> None:
    """``pad_token = eos_token`` when the tokenizer has none; the config learns its id (GPT-2
    style sequence classifiers find each record's last token through it)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SetupError(
                f"the tokenizer of {source} has neither a pad nor an eos token: save one with "
                "tokenizer.pad_token = ... before fine-tuning"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id


def _attach_label_words(
    loaded: LoadedModel, prompt: str | None, label_words: Sequence[str] | None
) -> None:
    """Prompt and label words of a causal LM (none for a generation target)."""
    if loaded.label_names is None:
        if label_words is not None:
            raise SetupError("--label-words needs the label set: pass --labels")
        loaded.prompt = prompt
        return
    prompt = DEFAULT_PROMPT if prompt is None else str(prompt)
    if "{text}" not in prompt:
        raise SetupError(f"--prompt {prompt!r} has no {{text}} placeholder for the record")
    if label_words is None:
        wordy = [name for name in loaded.label_names if not re.fullmatch(r"\S+", name)]
        if wordy:
            raise SetupError(
                f"labels {wordy} are not single words, so there is no default label word: "
                "pass --label-words w1,w2,... (one single-token word per label)"
            )
        label_words = [" " + name for name in loaded.label_names]
    words = tuple(str(word) for word in label_words)
    if len(words) != len(loaded.label_names):
        raise SetupError(
            f"--label-words has {len(words)} words for {len(loaded.label_names)} labels "
            f"{list(loaded.label_names)}: give one word per label, in the labels' order"
        )
    try:
        ids = tasks.label_token_ids(loaded.tokenizer, words)
    except ValueError as exc:
        raise SetupError(f"--label-words: {exc}") from None
    loaded.prompt, loaded.label_words, loaded.label_word_ids = prompt, words, ids


# ---------------------------------------------------------------------------------------------
# trainable selection
# ---------------------------------------------------------------------------------------------

_PART = re.compile(r"^(classifier|head|all|bias|last(\d+))$")
_LORA = re.compile(r"(?:^|\+)\s*lora\s*(?::(.*))?$", re.IGNORECASE)
_PARTS_HELP = (
    "classifier, head, lastN (the last N transformer layers), bias (the bias terms), all, "
    "lora[:r=8,alpha=16,targets=q_proj+v_proj], joined with '+' (lora last), e.g. head+last2"
)
#: LoRA target pairs by family, tried in order against the module names of the layers.
LORA_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # Llama, OPT, Mistral, Qwen, SmolLM2, ...
    ("query", "value"),  # BERT, RoBERTa, MiniLM
    ("c_attn",),  # GPT-2
    ("query_key_value",),  # GPT-NeoX, Falcon, BLOOM
    ("q_lin", "v_lin"),  # DistilBERT
    ("qkv_proj",),  # Phi-3
    ("Wqkv",),  # ModernBERT, MPT
    ("q", "v"),  # T5
)


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """``lora:r=8,alpha=16,targets=q_proj+v_proj`` (peft ``LoraConfig``: ``r``, ``lora_alpha``,
    ``target_modules``; ``targets=None``: :func:`lora_default_targets`)."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None


@dataclasses.dataclass
class Selection:
    """What :func:`select_trainable` chose.

    Attributes:
        model: the model to train (a ``peft.PeftModel`` wrapping the loaded one for ``lora``).
        names: ``model.named_parameters()`` names of the trainable tensors.
        spec: the ``--trainable`` value.
        lora: the LoRA options (``None`` without ``lora``).
    """

    model: nn.Module
    names: list[str]
    spec: str
    lora: LoraOptions | None = None

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors, in ``model.named_parameters()`` order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


def parse_trainable_spec(spec: str) -> tuple[set[str], int, LoraOptions | None]:
    """``"head+last2"`` -> ({"head"}, 2, None); ``"bias+lora:r=4"`` -> ({"bias"}, 0, r=4).

    Raises:
        SetupError: an unknown part or LoRA option, ``last0``, an empty spec.
    """
    text = str(spec).strip()
    lora = None
    match = _LORA.search(text)
    if match:
        lora = _parse_lora(spec, match.group(1) or "")
        text = text[: match.start()]
    parts: set[str] = set()
    last = 0
    for raw in filter(None, (t.strip().lower() for t in text.replace(",", "+").split("+"))):
        found = _PART.match(raw)
        if not found:
            raise SetupError(f"--trainable {spec!r}: unknown part {raw!r}; use {_PARTS_HELP}")
        if found.group(2) is None:
            parts.add(raw)
        elif int(found.group(2)) < 1:
            raise SetupError(f"--trainable {spec!r}: lastN needs N >= 1")
        else:
            last = max(last, int(found.group(2)))
    if not parts and not last and lora is None:
        raise SetupError(f"--trainable {spec!r} names nothing; use {_PARTS_HELP}")
    return parts, last, lora


def _parse_lora(spec: str, options: str) -> LoraOptions:
    values: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, _, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        try:
            if key == "r":
                values["r"] = int(value)
                ok = values["r"] >= 1
            elif key == "alpha":
                values["alpha"] = float(value)
                ok = values["alpha"] > 0
            elif key == "targets":
                values["targets"] = tuple(t.strip() for t in value.split("+") if t.strip())
                ok = bool(values["targets"])
            else:
                ok = False
        except ValueError:
            ok = False
        if not ok:
            raise SetupError(
                f"--trainable {spec!r}: bad LoRA option {item!r}; use r=INT>=1, alpha=NUMBER>0, "
                "targets=NAME+NAME (module names), comma-separated, with lora last"
            )
    return LoraOptions(**values)


def select_trainable(
    model: LoadedModel | nn.Module, spec: str, *, kind: str | None = None, seed: int = 0
) -> Selection:
    """Mark the tensors ``--trainable spec`` trains (``requires_grad``) and freeze the rest.

    Parts (joined with ``+``): ``classifier`` (a classifier's head modules, e.g. ``classifier``,
    ``score``), ``head`` (a classifier: those and the pooler; a causal LM: the final norm, the
    tied LM head staying frozen), ``lastN`` (the last N blocks of the layer stack), ``bias``
    (every bias term: BitFit), ``all``, and last ``lora[:r=..,alpha=..,targets=a+b]``: peft's
    ``LoraConfig``/``get_peft_model`` on the named linear modules of the layer stack (defaults:
    ``r=8, alpha=16``, targets from :func:`lora_default_targets`), the adapter matrices being
    trainable. With ``lora`` the base weights stay frozen unless another part selects them; a
    classifier's head modules and the modules the folder had no weights for are saved with
    the adapter (peft ``modules_to_save``), so that the adapter folder reproduces the model.

    Args:
        model: a :class:`LoadedModel` (its ``model`` becomes the PEFT model for ``lora``) or a
            transformers model.
        spec: the ``--trainable`` value.
        kind: ``"classifier"`` / ``"causal"`` for a bare model (default: from its class).
        seed: public seed of the LoRA initialisation (a forked RNG).

    Raises:
        SetupError: a bad spec, a part the model lacks, a selection of no parameter.
    """
    parts, last, lora = parse_trainable_spec(spec)
    loaded = model if isinstance(model, LoadedModel) else None
    net = loaded.model if loaded is not None else model
    kind = loaded.kind if loaded is not None else (kind or _kind_of(net))
    prefixes = _chosen_modules(_unwrapped(net), kind, parts, last, spec)
    if lora is not None:
        save = _classifier_heads(net) if kind == "classifier" else []
        save += list(loaded.fresh_modules) if loaded is not None else []
        net = _apply_lora(net, kind, lora, spec, sorted(set(save)), seed)
        if loaded is not None:
            loaded.model = net
    names = []
    for name, param in net.named_parameters():
        param.requires_grad_(_wanted(name, prefixes, "bias" in parts, lora is not None))
        if param.requires_grad:
            names.append(name)
    if not names:
        raise SetupError(
            f"--trainable {spec!r} selects no parameter of this {type(_unwrapped(net)).__name__} "
            f"(e.g. Llama-style models have no bias terms); use {_PARTS_HELP}"
        )
    net.eval()
    return Selection(net, names, str(spec), lora)


def _unwrapped(net: nn.Module) -> nn.Module:
    get = getattr(net, "get_base_model", None)
    return get() if callable(get) else net


def _kind_of(net: nn.Module) -> str:
    seq_cls, causal, _ = _auto_tables()
    name = type(_unwrapped(net)).__name__
    if name in _names(seq_cls):
        return "classifier"
    if name in _names(causal):
        return "causal"
    raise SetupError(f"cannot tell the kind of a {name}: pass kind='classifier' or 'causal'")


def _plain(name: str) -> str | None:
    """A PEFT parameter name as the unwrapped model names it (``None``: a frozen original)."""
    if ".original_module." in name:
        return None
    name = name.removeprefix("base_model.model.")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def _wanted(name: str, prefixes: Sequence[str], bias: bool, lora: bool) -> bool:
    plain = _plain(name)
    if plain is None:
        return False
    if lora and ".lora_" in name:
        return True
    if bias and plain.rsplit(".", 1)[-1] == "bias":
        return True
    return any(p == "" or plain == p or plain.startswith(p + ".") for p in prefixes)


def _chosen_modules(net: nn.Module, kind: str, parts: set[str], last: int, spec: str) -> list[str]:
    """Names (in the unwrapped model) of the modules whose tensors the parts select."""
    chosen = [""] if "all" in parts else []
    if kind == "causal" and "classifier" in parts:
        raise SetupError(
            f"--trainable {spec!r}: classifier applies to a classifier; a causal LM answers "
            "with label words through its LM head: use head (the final norm), lastN, bias, lora"
        )
    if "classifier" in parts or "head" in parts:
        chosen += _classifier_heads(net) if kind == "classifier" else _final_norms(net, spec)
    if "head" in parts and kind == "classifier":
        base = net.base_model_prefix
        pooler = getattr(getattr(net, base, None), "pooler", None)
        if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
            chosen.append(f"{base}.pooler")
    if last:
        layers_name, layers = find_layers(net)
        if last > len(layers):
            raise SetupError(f"--trainable last{last}: the model has only {len(layers)} layers")
        chosen += [f"{layers_name}.{i}" for i in range(len(layers) - last, len(layers))]
    return chosen


def _classifier_heads(net: nn.Module) -> list[str]:
    """A sequence classifier's head: its top-level modules with tensors outside the base model
    (``classifier`` for BERT/RoBERTa, ``score`` for GPT-2/OPT/Llama)."""
    net = _unwrapped(net)
    base = getattr(net, "base_model_prefix", "")
    return [
        name
        for name, child in net.named_children()
        if name != base and any(True for _ in child.parameters())
    ]


def _final_norms(net: nn.Module, spec: str) -> list[str]:
    """A causal LM's norms above the layer stack (``norm``, ``ln_f``, ``final_layer_norm``)."""
    layers_name, _ = find_layers(net)
    emb_name, _ = find_embeddings(net, layers_name)
    found = [
        name
        for name, module in net.named_modules()
        if "norm" in type(module).__name__.lower()
        and any(True for _ in module.parameters(recurse=False))
        and not name.startswith((layers_name + ".", emb_name + "."))
    ]
    if not found:
        raise SetupError(
            f"--trainable {spec!r}: {type(net).__name__} has no final norm above its layers "
            "for head; use lastN, bias or lora"
        )
    return found


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | Conv1D)


def lora_default_targets(model: nn.Module) -> tuple[str, ...]:
    """The first of :data:`LORA_TARGETS` whose names are all linear modules of the layers."""
    _, layers = find_layers(_unwrapped(model))
    present = {n.rsplit(".", 1)[-1] for n, m in layers.named_modules() if _is_linear(m)}
    for targets in LORA_TARGETS:
        if set(targets) <= present:
            return targets
    raise SetupError(
        f"no default LoRA targets for {type(_unwrapped(model)).__name__}: pass "
        f"--trainable lora:targets=NAME+NAME with linear modules of its layers: {sorted(present)}"
    )


def _apply_lora(
    net: nn.Module, kind: str, options: LoraOptions, spec: str, save: list[str], seed: int
) -> nn.Module:
    """peft's ``get_peft_model`` with adapters on ``options.targets`` inside the layer stack."""
    import peft

    if isinstance(net, peft.PeftModel):
        raise SetupError(f"--trainable {spec!r}: the model already carries LoRA adapters")
    layers_name, layers = find_layers(net)
    targets = options.targets or lora_default_targets(net)
    linear = {n.rsplit(".", 1)[-1]: m for n, m in layers.named_modules() if _is_linear(m)}
    missing = [t for t in targets if t not in linear]
    if missing:
        raise SetupError(
            f"--trainable {spec!r}: LoRA targets {missing} are not linear modules of the "
            f"layers; choose among {sorted(linear)}"
        )
    names = "|".join(re.escape(t) for t in targets)
    config = peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=0.0,
        target_modules=rf"{re.escape(layers_name)}\.\d+\.(?:.*\.)?(?:{names})",
        bias="none",
        task_type="SEQ_CLS" if kind == "classifier" else "CAUSAL_LM",
        modules_to_save=save or None,
        fan_in_fan_out=type(linear[targets[0]]).__name__ == "Conv1D",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(net, config)

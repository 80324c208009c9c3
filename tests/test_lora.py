"""DP-AggZO on a LoRA-wrapped packaged model trains the adapters only (peft LoraConfig)."""

from __future__ import annotations

import functools

import pytest
import torch

from zoprivacy import tasks
from zoprivacy.optim.optimizer import DPAggZO
from zoprivacy.tasks.packaged import PackageNotInstalled, load_minilm_classifier
from zoprivacy.tasks.prefix import PrefixCache

peft = pytest.importorskip("peft")
pytestmark = [
    pytest.mark.filterwarnings("ignore::zoprivacy.noise.source.PredictableNoiseWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]


def test_dpaggzo_on_lora_minilm_trains_only_the_adapters():
    try:
        base, tok = load_minilm_classifier(2, seed=0)
    except PackageNotInstalled as exc:
        pytest.skip(str(exc))
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        layers_to_transform=[4, 5],
        bias="none",
    )
    model = peft.get_peft_model(base, config)
    model.eval()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names), names
    assert len(names) == 2 * 2 * 2  # A and B of query and value in layers 4 and 5
    # lora_B starts at zero: move it off zero so that lora_A matters at the first step too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    texts = ["a gripping, beautiful film", "dull and far too long", "fine.", "loved it"]
    batch = tasks.encode_classification(tok, texts, [1, 0, 1, 1], 32)
    cache = PrefixCache(model)
    assert cache.first_trainable == 4  # the adapters live in the last two layers
    losses = cache.wrap(functools.partial(tasks.sequence_classification_losses, model))
    tasks.check_per_sample(losses, batch, atol=1e-6, rtol=1e-6)

    opt = DPAggZO(
        [p for p in model.parameters() if p.requires_grad],
        5e-2,
        num_directions=2,
        clip_norm=1.0,
        noise_multiplier=0.5,
        expected_batch_size=4,
        seed=1,
        noise_seed=2,
    )
    for _ in range(2):
        stats = opt.step(lambda: losses(batch))
    assert stats.perturbation_path == "hooks"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # base weights bit for bit
        else:
            assert not torch.equal(p, adapters[n]), n  # every adapter moved

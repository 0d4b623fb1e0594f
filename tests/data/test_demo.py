"""fastsae.demo: the embedded corpus and the tiny model, loaded offline."""

from __future__ import annotations

import json
import re

import pytest

from fastsae.demo import corpus
from fastsae.demo.model import ASSETS, load_demo_tokenizer


def test_corpus_is_read_from_the_installed_package():
    chapters = corpus.chapters()
    assert len(chapters) == 1189  # every chapter of the Bible
    assert chapters[0].startswith("In the beginning God created")
    assert not any(re.search(r"\d+:\d+", c) for c in chapters[:50])  # verse numbers removed
    words = sum(len(c.split()) for c in chapters)
    assert 750_000 < words < 850_000


def test_held_out_split_is_disjoint_and_about_five_percent():
    train, held = corpus.documents("train"), corpus.documents("held_out")
    assert len(train) + len(held) == 1189 and len(held) == 59
    assert not set(train) & set(held)
    with pytest.raises(ValueError, match="split='test' is unknown"):
        corpus.documents("test")


def test_assets_are_small_and_safetensors():
    weights = ASSETS / "model.safetensors"
    assert weights.stat().st_size <= 8 * 2**20
    assert not list(ASSETS.glob("*.pt")) and not list(ASSETS.glob("*.bin"))


def test_model_loads_offline_into_hooked_transformer(demo_model):
    from transformer_lens import HookedTransformer

    assert isinstance(demo_model, HookedTransformer)
    assert demo_model.cfg.n_layers >= 2
    tokens = demo_model.to_tokens("And God said, Let there be light: and there was light.")
    assert tokens[0, 0] == demo_model.tokenizer.bos_token_id  # BOS prepended
    logits, cache = demo_model.run_with_cache(tokens)
    assert logits.shape == (1, tokens.shape[1], demo_model.cfg.d_vocab)
    assert cache["blocks.1.hook_resid_post"].shape == (1, tokens.shape[1], 128)


def test_tokenizer_round_trips_text():
    tok = load_demo_tokenizer()
    text = "Blessed are the meek: for they shall inherit the earth."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_held_out_loss_matches_metrics_and_beats_unigram(demo_model):
    from tokenizers import Tokenizer

    from fastsae.demo.make_model import _sequences, held_out_loss, unigram_loss

    metrics = json.loads((ASSETS / "metrics.json").read_text())
    assert metrics["held_out_loss"] < metrics["unigram_held_out_loss"] - 1.0  # nats
    held = _sequences(Tokenizer.from_file(str(ASSETS / "tokenizer.json")), "held_out", 128)
    assert held.shape[1] == 128
    # The committed weights are the ones that were measured (on every 8th sequence, to be fast;
    # the subset's loss is 0.07 nats from the whole split's).
    subset = held[::8]
    loss = held_out_loss(demo_model, subset)
    assert abs(loss - metrics["held_out_loss"]) < 0.15
    # Even a unigram model fitted on the held-out text itself is far behind.
    assert loss < unigram_loss(held, subset, demo_model.cfg.d_vocab) - 1.0

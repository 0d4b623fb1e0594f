"""The embedded demo model: a tiny causal LM trained on the embedded corpus, loaded offline into
TransformerLens's ``HookedTransformer``.

Everything comes from ``fastsae/demo/assets`` (written by :mod:`fastsae.demo.make_model`):

- ``config.json``: the ``HookedTransformerConfig`` fields and the tokenizer's special tokens;
- ``tokenizer.json``: a byte-level BPE tokenizer (the ``tokenizers`` library);
- ``model.safetensors``: the parameters, float32 (no pickle: loading runs no code);
- ``metrics.json``: held-out loss against a unigram model, and how it was trained.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ASSETS",
    "DEFAULT_HOOK",
    "MODEL_NAME",
    "hooked_config",
    "load_demo_model",
    "load_demo_tokenizer",
    "wrap_tokenizer",
]

ASSETS = Path(__file__).parent / "assets"
MODEL_NAME = "fastsae-demo-kjv"
#: The hook an SAE on the demo model reads by default: the middle of its three layers.
DEFAULT_HOOK = "blocks.1.hook_resid_post"

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"


def _read_config(assets: Path) -> dict[str, Any]:
    path = assets / CONFIG
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the demo model is built by `python -m fastsae.demo.make_model`"
        )
    return json.loads(path.read_text())


def wrap_tokenizer(tokenizer_json: str, special: dict[str, str]):
    """An HF ``PreTrainedTokenizerFast`` around a serialized ``tokenizers`` tokenizer.

    ``add_bos_token=True`` and a ``name_or_path`` keep TransformerLens from looking the tokenizer
    up on the hub (it re-downloads any tokenizer that does not prepend BOS itself)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        bos_token=special["bos_token"],
        eos_token=special["eos_token"],
        pad_token=special["pad_token"],
        add_bos_token=True,
        name_or_path=MODEL_NAME,
    )


def load_demo_tokenizer(assets: str | Path = ASSETS):
    """The demo model's tokenizer (prepends BOS when called with ``add_special_tokens=True``)."""
    assets = Path(assets)
    cfg = _read_config(assets)
    return wrap_tokenizer((assets / TOKENIZER).read_text(), cfg["tokenizer"])


def hooked_config(config: dict[str, Any], device: str | torch.device | None = None):
    """``HookedTransformerConfig`` from the ``hooked_transformer`` section of ``config.json``."""
    from transformer_lens import HookedTransformerConfig

    kwargs = dict(config)
    if device is not None:
        kwargs["device"] = str(device)
    return HookedTransformerConfig(**kwargs)


def load_demo_model(device: str | torch.device | None = "cpu", assets: str | Path = ASSETS):
    """The demo model as a ``HookedTransformer``, in eval mode, loaded without any network access.

    Raises:
        FileNotFoundError: the assets are missing.
        ValueError: ``model.safetensors`` does not match ``config.json``.
    """
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer

    assets = Path(assets)
    cfg = _read_config(assets)
    with warnings.catch_warnings():
        # TransformerLens 3.x points at its 4.x successor; HookedTransformer is what 3.x is for.
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(
            hooked_config(cfg["hooked_transformer"], device="cpu"),
            tokenizer=wrap_tokenizer((assets / TOKENIZER).read_text(), cfg["tokenizer"]),
            move_to_device=False,
        )
    state = load_file(str(assets / WEIGHTS))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"{assets / WEIGHTS} does not match {CONFIG}: missing {missing}, unexpected {extra}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"{assets / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    model.eval()
    if device is not None and str(device) != "cpu":
        model = model.to(device)
        model.cfg.device = str(device)
    return model

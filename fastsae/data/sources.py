"""Activation sources: one model pass -> activations ``[tokens, d]`` for one or more hook points.

Two kinds of model are supported behind one interface, :class:`ActivationSource`:

- :class:`TransformerLensSource`: a ``HookedTransformer`` and any of its hook names
  (``blocks.3.hook_resid_post``, ``blocks.2.hook_mlp_out``, ``blocks.0.attn.hook_z`` ...). The
  forward pass stops after the last block that a hook needs.
- :class:`HFSource`: any ``transformers`` model and module paths (``model.layers.3``,
  ``transformer.h.3.mlp``, ``encoder.layer.2``). A path captures the module's output;
  ``path:input`` captures its input. The forward pass is cut short once every hook has fired.

A transcoder reads two hooks of the same pass, for example
``TransformerLensSource(model, ["blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"])``: every
row of the two outputs belongs to the same token.

Rows come out in (sequence, position) order with three metadata columns beside the hooks:
``tokens`` (the token id), ``sequence`` (which sequence of the batch, or of the stream) and
``position`` (the position inside it). BOS and pad positions are dropped on request.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "META_COLUMNS",
    "POSITION",
    "SEQUENCE",
    "TOKENS",
    "ActivationSource",
    "HFSource",
    "TransformerLensSource",
    "unknown_hook_error",
]

TOKENS = "tokens"
SEQUENCE = "sequence"
POSITION = "position"
#: Columns every chunk carries beside the hooks; no hook may use these names.
META_COLUMNS = (TOKENS, SEQUENCE, POSITION)

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed", "hook_tokens")


def unknown_hook_error(unknown: Sequence[str], valid: Sequence[str], what: str) -> ValueError:
    """One ValueError for every unknown name, each with the nearest valid names."""
    lines = []
    for name in unknown:
        near = difflib.get_close_matches(name, valid, n=5, cutoff=0.5) or list(valid[:5])
        lines.append(f"  {name!r}: nearest valid names: {', '.join(near)}")
    return ValueError(
        f"unknown {what} for this model ({len(valid)} valid names):\n" + "\n".join(lines)
    )


class ActivationSource:
    """Runs a model on token batches and returns the activations of :attr:`hooks` as rows.

    Subclasses implement :meth:`_run` (``tokens [b, s]`` -> ``{hook: [b, s, ...]}``); this class
    flattens, drops BOS / pad positions and adds the metadata columns.
    """

    hooks: tuple[str, ...]
    dims: dict[str, int]
    model_name: str

    def __init__(
        self,
        hooks: str | Sequence[str],
        *,
        drop_bos: bool = True,
        drop_pad: bool = True,
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self.hooks = (hooks,) if isinstance(hooks, str) else tuple(hooks)
        if not self.hooks:
            raise ValueError("hooks is empty; name at least one hook")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"hooks={list(self.hooks)} names a hook twice")
        clash = [h for h in self.hooks if h in META_COLUMNS]
        if clash:
            raise ValueError(f"hook names {clash} are reserved for metadata columns")
        self.drop_bos = drop_bos
        self.drop_pad = drop_pad
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id

    # -- subclass interface --------------------------------------------------------------------

    def _run(self, tokens: Tensor, attention_mask: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    # -- public --------------------------------------------------------------------------------

    def keep_mask(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``bool [b, s]``: the positions whose activations are kept."""
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if self.drop_bos and self.bos_token_id is not None:
            keep &= tokens != self.bos_token_id
        if self.drop_pad:
            if attention_mask is not None:
                keep &= attention_mask.to(tokens.device).bool()
            elif self.pad_token_id is not None and self.pad_token_id != self.bos_token_id:
                keep &= tokens != self.pad_token_id
        return keep

    @torch.no_grad()
    def activations(
        self, tokens: Tensor, attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Run the model once on ``tokens [b, s]`` (int) and return rows for the kept positions:

        ``{hook: [n, d] (model dtype), "tokens": [n] int64, "sequence": [n] int64 (row of the
        batch), "position": [n] int64}``, all on the model's device, in (sequence, position) order.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}; expected [batch, seq]")
        tokens = tokens.to(self.device)
        raw = self._run(tokens, attention_mask)
        keep = self.keep_mask(tokens, attention_mask)
        out: dict[str, Tensor] = {}
        for hook in self.hooks:
            act = raw[hook]
            out[hook] = act.reshape(*act.shape[:2], -1)[keep]
        seq, pos = keep.nonzero(as_tuple=True)
        out[TOKENS] = tokens[keep].long()
        out[SEQUENCE] = seq
        out[POSITION] = pos
        return out

    def stream(
        self, batches: Iterable[Tensor], *, first_sequence: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        """:meth:`activations` of every batch, with ``sequence`` counted across the whole stream
        (starting at ``first_sequence``). Feed it to :class:`fastsae.data.ActivationShuffler`."""
        offset = first_sequence
        for tokens in batches:
            chunk = self.activations(tokens)
            chunk[SEQUENCE] += offset
            offset += tokens.shape[0]
            yield chunk

    def _probe_dims(self) -> dict[str, int]:
        """Width of each hook, from a 2-token pass; rejects hooks that are not per-token."""
        tokens = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        with torch.no_grad():
            raw = self._run(tokens, None)
        dims = {}
        for hook in self.hooks:
            shape = tuple(raw[hook].shape)
            if len(shape) < 2 or shape[:2] != (1, 2):
                raise ValueError(
                    f"hook {hook!r} gives shape {shape} for tokens [1, 2]; only per-token "
                    "activations [batch, seq, ...] can be collected (not attention patterns)"
                )
            dims[hook] = math.prod(shape[2:])
        return dims


class TransformerLensSource(ActivationSource):
    """Activations from a TransformerLens ``HookedTransformer`` (any hook name).

    ``bos_token_id`` / ``pad_token_id`` default to the model tokenizer's. With ``drop_bos`` and
    ``drop_pad`` (both default True) those positions are left out.
    """

    def __init__(
        self,
        model: Any,
        hooks: str | Sequence[str],
        *,
        drop_bos: bool = True,
        drop_pad: bool = True,
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        tok = getattr(model, "tokenizer", None)
        super().__init__(
            hooks,
            drop_bos=drop_bos,
            drop_pad=drop_pad,
            bos_token_id=bos_token_id if bos_token_id is not None else _attr(tok, "bos_token_id"),
            pad_token_id=pad_token_id if pad_token_id is not None else _attr(tok, "pad_token_id"),
        )
        self.model = model
        valid = list(model.hook_dict)
        unknown = [h for h in self.hooks if h not in model.hook_dict]
        if unknown:
            raise unknown_hook_error(unknown, valid, "hook names")
        self.stop_at_layer = _stop_at_layer(self.hooks, model.cfg.n_layers)
        self.model_name = model.cfg.model_name
        self.context_size = model.cfg.n_ctx
        self.dims = self._probe_dims()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _run(self, tokens: Tensor, attention_mask: Tensor | None) -> dict[str, Tensor]:
        store: dict[str, Tensor] = {}

        def save(act: Tensor, hook: Any) -> None:
            store[hook.name] = act

        kwargs: dict[str, Any] = {"stop_at_layer": self.stop_at_layer}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(tokens.device)
        self.model.run_with_hooks(tokens, fwd_hooks=[(h, save) for h in self.hooks], **kwargs)
        return store


def _stop_at_layer(hooks: Sequence[str], n_layers: int) -> int | None:
    """Blocks to run: one past the deepest block a hook lives in; None runs the whole model."""
    needed = 0
    for hook in hooks:
        match = _BLOCK.match(hook)
        if match:
            needed = max(needed, int(match.group(1)) + 1)
        elif hook not in _BEFORE_BLOCKS:
            return None  # ln_final, unembed ...: the full pass
    return needed if needed < n_layers else None


def _attr(obj: Any, name: str) -> Any:
    return getattr(obj, name, None) if obj is not None else None


class _StopForward(Exception):
    """Raised from the last hook that fires, to skip the rest of an HF forward pass."""


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in map(_first_tensor, value) if v is not None), None)
    if isinstance(value, dict):
        return next((v for v in map(_first_tensor, value.values()) if v is not None), None)
    return None


class HFSource(ActivationSource):
    """Activations from a ``transformers`` model (``AutoModel``, ``AutoModelForCausalLM``, ...).

    ``hooks`` are module paths as in ``model.named_modules()``; ``"path"`` takes the module's
    output (the first tensor of a tuple output), ``"path:input"`` its first input. The pass is
    stopped as soon as every hook has fired, so later layers never run.
    ``bos_token_id`` / ``pad_token_id`` default to the model config's.
    """

    def __init__(
        self,
        model: nn.Module,
        hooks: str | Sequence[str],
        *,
        drop_bos: bool = True,
        drop_pad: bool = True,
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        config = getattr(model, "config", None)
        super().__init__(
            hooks,
            drop_bos=drop_bos,
            drop_pad=drop_pad,
            bos_token_id=bos_token_id
            if bos_token_id is not None
            else _attr(config, "bos_token_id"),
            pad_token_id=pad_token_id
            if pad_token_id is not None
            else _attr(config, "pad_token_id"),
        )
        self.model = model
        modules = dict(model.named_modules())
        self._targets: dict[str, tuple[nn.Module, bool]] = {}
        unknown = []
        for hook in self.hooks:
            path, _, side = hook.partition(":")
            if side not in ("", "input", "output") or path not in modules:
                unknown.append(hook)
                continue
            self._targets[hook] = (modules[path], side == "input")
        if unknown:
            raise unknown_hook_error(unknown, [n for n in modules if n], "module paths")
        self.model_name = _attr(config, "_name_or_path") or type(model).__name__
        self.context_size = _attr(config, "max_position_embeddings")
        self.dims = self._probe_dims()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _run(self, tokens: Tensor, attention_mask: Tensor | None) -> dict[str, Tensor]:
        store: dict[str, Tensor] = {}
        handles = []

        def saver(hook: str, is_input: bool):
            def save(module, args, kwargs_or_output, output=None):
                value = (args, kwargs_or_output) if is_input else kwargs_or_output
                if hook not in store:
                    tensor = _first_tensor(value)
                    if tensor is None:
                        raise TypeError(f"module {hook!r} produced no tensor to collect")
                    store[hook] = tensor
                if len(store) == len(self.hooks):
                    raise _StopForward

            return save

        for hook, (module, is_input) in self._targets.items():
            fn = saver(hook, is_input)
            if is_input:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
        try:
            self.model(input_ids=tokens, attention_mask=mask.to(tokens.device))
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [h for h in self.hooks if h not in store]
        if missing:
            raise RuntimeError(f"modules {missing} never ran in the forward pass")
        return store

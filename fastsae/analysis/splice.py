"""Splice SAEs and transcoders into a TransformerLens or ``transformers`` model.

A *site* is one SAE at its hook points. For an SAE the activation at ``hook`` is replaced by its
reconstruction; for a transcoder the activation at ``hook_out`` is replaced by its prediction from
the activation at ``hook_in``. Hook names are TransformerLens hook names
(``blocks.1.hook_resid_post``) or ``transformers`` module paths (``transformer.h.1``,
``transformer.h.1.mlp:input`` for a module's input), as in :mod:`fastsae.data.sources`. Both are
plain ``nn.Module`` forward hooks (a TransformerLens hook point is an identity module), so one
mechanism serves both libraries.

With ``error_term=True`` (the default) the SAE's error ``act - recon`` is added back, so the model
computes exactly what it computed without the splice until an edit changes a feature; the edit then
moves the activation by ``decode(edited) - decode(codes)``. With ``error_term=False`` the model runs
on the reconstruction itself (what CE/KL scores measure).

Example::

    with Splice(model, sae) as sp:          # sae.cfg.hook_name says where
        logits = model(tokens)              # unchanged
        codes = sp.codes[sae.cfg.hook_name] # SparseCodes [b, s, k] of that run
        sp.edit(sae.cfg.hook_name, Ablate([5]))
        ablated = model(tokens)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastsae.analysis.codes import SparseCodes, encode_codes
from fastsae.analysis.intervene import Edit
from fastsae.data.sources import unknown_hook_error
from fastsae.sae import SAE

__all__ = [
    "Site",
    "Splice",
    "is_transformer_lens",
    "model_output",
    "read_features",
    "resolve_hook",
    "sites",
]


@dataclass
class Site:
    """One SAE at its hooks. ``hook_out`` equals ``hook_in`` for an SAE; ``name`` (the key of
    :attr:`Splice.codes` and :meth:`Splice.edit`) is ``hook_in``."""

    sae: SAE
    hook_in: str
    hook_out: str

    @property
    def name(self) -> str:
        return self.hook_in

    @property
    def is_transcoder(self) -> bool:
        return self.hook_in != self.hook_out


def sites(saes: SAE | Sequence[SAE | Site] | Mapping[Any, SAE]) -> list[Site]:
    """Normalise ``saes``: one SAE or a list (hooks from ``sae.cfg.hook_name`` /
    ``hook_name_out``; :class:`Site` objects pass through), or a dict ``{hook: sae}`` /
    ``{(hook_in, hook_out): transcoder}``."""
    if isinstance(saes, (SAE, Site)):
        saes = [saes]
    items = list(saes.items()) if isinstance(saes, Mapping) else [(None, s) for s in saes]
    out = []
    for key, sae in items:
        if isinstance(sae, Site):
            key, sae = (sae.hook_in, sae.hook_out), sae.sae
        if not isinstance(sae, SAE):
            raise TypeError(f"expected a fastsae SAE, got {type(sae).__name__}")
        if key is None:
            if sae.cfg.hook_name is None:
                raise ValueError("an SAE without cfg.hook_name needs a hook: pass {hook: sae}")
            key = (sae.cfg.hook_name, sae.cfg.hook_name_out or sae.cfg.hook_name)
        hook_in, hook_out = (key, key) if isinstance(key, str) else tuple(key)
        if sae.d_in != sae.d_out and hook_in == hook_out:
            raise ValueError(
                f"the transcoder at {hook_in!r} (d_in={sae.d_in}, d_out={sae.d_out}) needs an "
                "output hook: pass {(hook_in, hook_out): sae} or set cfg.hook_name_out"
            )
        out.append(Site(sae, hook_in, hook_out))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two sites read the same hook: {names}")
    if not out:
        raise ValueError("no SAEs to splice")
    return out


def is_transformer_lens(model: Any) -> bool:
    return hasattr(model, "hook_dict") and hasattr(model, "cfg")


def resolve_hook(model: nn.Module, hook: str) -> tuple[nn.Module, bool]:
    """``(module, is_input)`` for a hook name (``path`` or ``path:input``)."""
    path, _, side = hook.partition(":")
    modules = dict(model.named_modules())
    if side not in ("", "input", "output") or path not in modules or not path:
        valid = [n for n in modules if n]
        raise unknown_hook_error([hook], valid, "hook names")
    return modules[path], side == "input"


def model_output(model: Any, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``[b, s, vocab]`` logits of a TransformerLens or causal-LM ``transformers`` model (the last
    hidden state ``[b, s, d]`` for a model without an LM head) on ``tokens [b, s]``."""
    if is_transformer_lens(model):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return model(tokens, return_type="logits", **kwargs)
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    out = model(input_ids=tokens, attention_mask=mask)
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _first_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(
        f"{what} is a {type(value).__name__}; only a tensor or a tuple starting with one can be spliced"
    )


def _with_first(value: Any, new: Tensor) -> Any:
    if isinstance(value, Tensor):
        return new
    return type(value)([new, *value[1:]]) if isinstance(value, list) else (new, *value[1:])


class Splice:
    """Context manager that splices ``saes`` (see :func:`sites`) into ``model``.

    Args:
        error_term: add each SAE's error back (output unchanged until an edit).
        grad: keep feature activations in the autograd graph (for attribution): the codes are
            differentiable in the activation, and the error term is a separate graph node, so a
            gradient reaches ``codes[name].values`` through the decoder only and still flows to the
            activation with derivative one.

    Attributes:
        codes: ``{site name: SparseCodes [b, s, w]}`` of the latest forward (before edits).
        edited: ``{site name: SparseCodes}`` after edits (only sites with edits).
        where: optional bool ``[b, s]``: positions outside it keep the model's activation.
    """

    def __init__(
        self,
        model: nn.Module,
        saes: SAE | Sequence[SAE] | Mapping[Any, SAE],
        *,
        error_term: bool = True,
        grad: bool = False,
    ) -> None:
        self.model = model
        self.sites = sites(saes)
        self.error_term = error_term
        self.grad = grad
        self.codes: dict[str, SparseCodes] = {}
        self.edited: dict[str, SparseCodes] = {}
        self.edits: dict[str, list[Edit]] = {s.name: [] for s in self.sites}
        self.where: Tensor | None = None
        self._targets = [
            (s, resolve_hook(model, s.hook_in), resolve_hook(model, s.hook_out)) for s in self.sites
        ]
        self._handles: list[Any] = []
        self._inputs: dict[str, Tensor] = {}
        self._training: list[bool] = []

    # -- edits ----------------------------------------------------------------------------------

    def edit(self, name: str, *edits: Edit) -> Splice:
        """Add edits to site ``name`` (applied in order on every forward until :meth:`clear`)."""
        if name not in self.edits:
            raise ValueError(f"no site {name!r}; sites: {list(self.edits)}")
        for e in edits:
            if not isinstance(e, Edit):
                raise TypeError(f"{e!r} is not an Edit (Ablate, Scale, Clamp, Patch)")
        self.edits[name].extend(edits)
        return self

    def clear(self) -> Splice:
        """Remove every edit."""
        for lst in self.edits.values():
            lst.clear()
        return self

    # -- hooks ----------------------------------------------------------------------------------

    def __enter__(self) -> Splice:
        self._training = [s.sae.training for s in self.sites]
        for s in self.sites:
            s.sae.eval()
        for site, (mod_in, in_is_input), (mod_out, out_is_input) in self._targets:
            if site.is_transcoder:
                self._handles.append(self._register(mod_in, in_is_input, self._capture(site)))
            self._handles.append(self._register(mod_out, out_is_input, self._replacer(site)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for s, was in zip(self.sites, self._training, strict=True):
            s.sae.train(was)

    @staticmethod
    def _register(module: nn.Module, is_input: bool, fn):
        if is_input:
            return module.register_forward_pre_hook(lambda m, args: fn(args, "input"))
        return module.register_forward_hook(lambda m, args, out: fn(out, "output"))

    def _capture(self, site: Site):
        def capture(value: Any, side: str) -> None:
            self._inputs[site.name] = _first_tensor(value, f"the {side} of {site.hook_in!r}")

        return capture

    def _replacer(self, site: Site):
        def replace(value: Any, side: str) -> Any:
            act = _first_tensor(value, f"the {side} of {site.hook_out!r}")
            x = self._inputs.pop(site.name, None) if site.is_transcoder else act
            if x is None:
                raise RuntimeError(f"{site.hook_in!r} did not run before {site.hook_out!r}")
            return _with_first(value, self._splice(site, x, act))

        return replace

    def _splice(self, site: Site, x: Tensor, act: Tensor) -> Tensor:
        """The new activation ``[b, s, ...]`` at ``site.hook_out``."""
        sae = site.sae
        x3 = x.reshape(*x.shape[:2], -1)
        a3 = act.reshape(*act.shape[:2], -1)
        if x3.shape[-1] != sae.d_in or a3.shape[-1] != sae.d_out:
            raise ValueError(
                f"site {site.name!r}: activations have width {x3.shape[-1]} -> {a3.shape[-1]}, "
                f"the SAE expects d_in={sae.d_in} -> d_out={sae.d_out}"
            )
        codes = encode_codes(sae, x3, grad=self.grad)
        self.codes[site.name] = codes
        edited = codes
        for e in self.edits[site.name]:
            edited = e.apply(edited, sae.d_sae)
        if self.edits[site.name]:
            self.edited[site.name] = edited
        skip_x = x3 if sae.W_skip is not None else None
        if not self.error_term:
            out = sae.decode_sparse(edited.values, edited.indices, skip_x)
        elif self.grad:
            # A second encode is the error's own node: the gradient reaching `codes.values` is the
            # decoder's alone, while d(out)/d(act) stays the identity.
            again = encode_codes(sae, x3, grad=True)
            recon = sae.decode_sparse(again.values, again.indices, skip_x)
            out = sae.decode_sparse(edited.values, edited.indices, skip_x) + (a3 - recon)
        elif edited is codes:
            return act
        else:
            out = a3.to(sae.dtype) + (
                sae.decode_sparse(edited.values, edited.indices, skip_x)
                - sae.decode_sparse(codes.values, codes.indices, skip_x)
            )
        out = out.to(act.dtype)
        if self.where is not None:
            out = torch.where(self.where.to(out.device).unsqueeze(-1), out, a3)
        return out.reshape(act.shape)


@torch.no_grad()
def read_features(
    model: nn.Module,
    saes: SAE | Sequence[SAE] | Mapping[Any, SAE],
    tokens: Tensor,
    attention_mask: Tensor | None = None,
) -> dict[str, SparseCodes]:
    """Feature activations ``{site name: SparseCodes [b, s, w]}`` of ``saes`` on ``tokens [b, s]``
    (one forward pass; the model's output is unchanged, each SAE sees the clean activation)."""
    with Splice(model, saes) as sp:
        model_output(model, tokens, attention_mask)
    return dict(sp.codes)

"""Evaluation to the field's standard, for TransformerLens and ``transformers`` models.

Downstream scores (the definitions of SAELens ``sae_lens/evals.py``, ``get_recons_loss`` and
``get_downstream_reconstruction_metrics``, which SAEBench's core evaluation reports), with the
activation zero-ablated as the baseline:

- ``ce_loss_score = (CE_abl - CE_sae) / (CE_abl - CE_clean)``;
- ``kl_div_score = (KL_abl - KL_sae) / KL_abl``, ``KL_x`` the mean over tokens of
  ``KL(p_clean || p_x)`` of the next-token distributions.

Special tokens (the tokenizer's BOS, EOS, PAD, SEP ids, as SAELens's ``get_special_token_ids``)
keep the model's own activation when the SAE is spliced in, and their positions are left out of
the means (for CE, the predictions made *at* them). Zero ablation zeroes every position.

Core metrics (SAELens ``get_sparsity_and_variance_metrics`` and SAEBench core): L0, L1, MSE,
explained variance ``1 - E||x - x̂||² / (E||x||² - ||E x||²)``, cosine similarity, L2 norms in and
out and their ratio, relative reconstruction bias ``E||x̂||² / E<x, x̂>`` (Wright & Sharkey 2024,
eq. 10), dead and dense fractions (feature density 0, > 10%), and from the weights the mean and
largest cosine of each latent to its nearest other latent (decoder rows, encoder columns) and the
mean encoder/decoder cosine of each latent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsae.analysis.codes import encode_codes
from fastsae.analysis.splice import Splice, model_output, resolve_hook, sites
from fastsae.sae import SAE

__all__ = [
    "DENSE_DENSITY",
    "core_metrics",
    "downstream_scores",
    "model_core_metrics",
    "special_token_ids",
    "weight_metrics",
    "zero_ablation",
]

#: A latent is "dense" when it fires on more than this fraction of tokens (SAEBench's 10%).
DENSE_DENSITY = 0.1
_SPECIAL = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
)


def special_token_ids(tokenizer: Any) -> list[int]:
    """The structural special tokens of ``tokenizer`` (BOS, EOS, PAD, SEP, decoder start)."""
    ids = {getattr(tokenizer, a, None) for a in _SPECIAL}
    return sorted(i for i in ids if isinstance(i, int))


def _keep_mask(tokens: Tensor, exclude: Sequence[int]) -> Tensor:
    if not exclude:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.as_tensor(list(exclude), device=tokens.device))


@contextlib.contextmanager
def zero_ablation(model: nn.Module, hooks: Sequence[str]) -> Iterator[None]:
    """Replace the activation at each hook (a module's output, or ``path:input``) by zeros."""
    handles = []
    for hook in hooks:
        module, is_input = resolve_hook(model, hook)
        if is_input:
            handles.append(
                module.register_forward_pre_hook(lambda m, a: (torch.zeros_like(a[0]), *a[1:]))
            )
        else:
            handles.append(module.register_forward_hook(lambda m, a, o: _zero_first(o)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _zero_first(out: Any) -> Any:
    if isinstance(out, Tensor):
        return torch.zeros_like(out)
    return (torch.zeros_like(out[0]), *out[1:])


def _token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """``[b, s-1]`` next-token cross-entropy, float64."""
    logp = F.log_softmax(logits[:, :-1].double(), -1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _token_kl(clean: Tensor, other: Tensor) -> Tensor:
    """``[b, s]`` ``KL(p_clean || p_other)``, float64."""
    p = F.log_softmax(clean.double(), -1)
    q = F.log_softmax(other.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


@torch.no_grad()
def downstream_scores(
    model: nn.Module,
    saes: SAE | Sequence[SAE] | Mapping[Any, SAE],
    token_batches: Iterable[Tensor],
    *,
    exclude_tokens: Sequence[int] | None = None,
) -> dict[str, float]:
    """CE-loss and KL scores of ``saes`` spliced together (no error term) into ``model``.

    Args:
        model: a ``HookedTransformer`` or a causal-LM ``transformers`` model (it must give logits).
        token_batches: ``LongTensor [b, s]`` batches.
        exclude_tokens: token ids kept out (default: the tokenizer's special tokens; ``[]`` for
            none). TransformerLens models use ``model.tokenizer``; an HF model its ``config``.

    Returns ``ce_loss_without_sae``, ``ce_loss_with_sae``, ``ce_loss_with_ablation``,
    ``ce_loss_score``, ``kl_div_with_sae``, ``kl_div_with_ablation``, ``kl_div_score``, ``tokens``.
    """
    site_list = sites(saes)
    if exclude_tokens is None:
        exclude_tokens = special_token_ids(
            getattr(model, "tokenizer", None) or getattr(model, "config", None)
        )
    sums = dict.fromkeys(("ce_clean", "ce_sae", "ce_abl", "kl_sae", "kl_abl"), 0.0)
    n_ce = n_kl = 0
    splice = Splice(model, site_list, error_term=False)
    for tokens in token_batches:
        if tokens.ndim != 2 or tokens.is_floating_point():
            raise ValueError(f"token batches must be int [batch, seq], got {tuple(tokens.shape)}")
        tokens = tokens.to(next(model.parameters()).device)
        keep = _keep_mask(tokens, exclude_tokens)
        clean = model_output(model, tokens)
        if clean.shape[-1] < 2 or clean.shape[:2] != tokens.shape:
            raise ValueError("the model gives no next-token logits: CE/KL need a language model")
        splice.where = keep
        with splice:
            spliced = model_output(model, tokens)
        with zero_ablation(model, [s.hook_out for s in site_list]):
            ablated = model_output(model, tokens)
        keep_ce = keep[:, :-1]
        for name, logits in (("clean", clean), ("sae", spliced), ("abl", ablated)):
            sums[f"ce_{name}"] += float(_token_ce(logits, tokens)[keep_ce].sum())
        sums["kl_sae"] += float(_token_kl(clean, spliced)[keep].sum())
        sums["kl_abl"] += float(_token_kl(clean, ablated)[keep].sum())
        n_ce += int(keep_ce.sum())
        n_kl += int(keep.sum())
    if n_ce == 0:
        raise ValueError("no tokens to score (every batch empty, or every token excluded)")
    m = {
        "ce_loss_without_sae": sums["ce_clean"] / n_ce,
        "ce_loss_with_sae": sums["ce_sae"] / n_ce,
        "ce_loss_with_ablation": sums["ce_abl"] / n_ce,
        "kl_div_with_sae": sums["kl_sae"] / n_kl,
        "kl_div_with_ablation": sums["kl_abl"] / n_kl,
        "tokens": float(n_kl),
    }
    denom = m["ce_loss_with_ablation"] - m["ce_loss_without_sae"]
    m["ce_loss_score"] = (m["ce_loss_with_ablation"] - m["ce_loss_with_sae"]) / denom
    m["kl_div_score"] = (m["kl_div_with_ablation"] - m["kl_div_with_sae"]) / m[
        "kl_div_with_ablation"
    ]
    return m


@torch.no_grad()
def core_metrics(
    sae: SAE, batches: Iterable[tuple[Tensor, Tensor | None]], *, weights: bool = True
) -> dict[str, float]:
    """SAEBench core metrics of ``sae`` (eval mode) over ``(x [N, d_in], y [N, d_out] or None)``
    row batches, through the fast sparse encode and decode; see the module docstring.

    ``weights`` adds :func:`weight_metrics`."""
    was_training = sae.training
    sae.eval()
    acc = dict.fromkeys(
        ("sq_err", "sq_norm", "l0", "l1", "cos", "norm_in", "norm_out", "ratio"), 0.0
    )
    acc.update(xhat2=0.0, dot=0.0)
    sum_y = None
    fired = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.device)
    n = 0
    for x, y in batches:
        x = x.to(sae.device, sae.dtype)
        y = x if y is None else y.to(sae.device, sae.dtype)
        codes = encode_codes(sae, x)
        xhat = sae.decode_sparse(codes.values, codes.indices, x if sae.W_skip is not None else None)
        yd, xh = y.double(), xhat.double()
        active = codes.values != 0
        acc["sq_err"] += float((yd - xh).pow(2).sum())
        acc["sq_norm"] += float(yd.pow(2).sum())
        sum_y = yd.sum(0) if sum_y is None else sum_y + yd.sum(0)
        acc["l0"] += float(active.sum())
        acc["l1"] += float(codes.values.double().abs().sum())
        nin, nout = yd.norm(dim=-1), xh.norm(dim=-1)
        acc["cos"] += float(((yd * xh).sum(-1) / (nin * nout)).nan_to_num().sum())
        acc["norm_in"] += float(nin.sum())
        acc["norm_out"] += float(nout.sum())
        acc["ratio"] += float((nout / torch.where(nin.abs() < 1e-4, 1.0, nin)).sum())
        acc["xhat2"] += float(nout.pow(2).sum())
        acc["dot"] += float((yd * xh).sum())
        fired.index_add_(
            0, codes.indices[active], torch.ones_like(codes.values[active], dtype=torch.float64)
        )
        n += x.shape[0]
    sae.train(was_training)
    if n == 0:
        raise ValueError("no evaluation tokens")
    total_var = acc["sq_norm"] / n - float(sum_y.pow(2).sum()) / n**2
    mse = acc["sq_err"] / n
    density = fired / n
    out = {
        "l0": acc["l0"] / n,
        "l1": acc["l1"] / n,
        "mse": mse,
        "explained_variance": 1.0 - mse / total_var if total_var > 1e-10 else float(mse < 1e-10),
        "cossim": acc["cos"] / n,
        "l2_norm_in": acc["norm_in"] / n,
        "l2_norm_out": acc["norm_out"] / n,
        "l2_ratio": acc["ratio"] / n,
        "relative_reconstruction_bias": acc["xhat2"] / acc["dot"],
        "frac_dead": float((density == 0).double().mean()),
        "frac_dense": float((density > DENSE_DENSITY).double().mean()),
        "tokens": float(n),
    }
    if weights:
        out.update(weight_metrics(sae))
    return out


def _max_other_cosine(rows: Tensor, chunk: int = 4096) -> Tensor:
    """``[n]``: each row's largest cosine to any other row, in chunks (memory ``chunk × n``)."""
    unit = F.normalize(rows.double(), dim=-1)
    best = torch.empty(unit.shape[0], dtype=torch.float64, device=unit.device)
    for s in range(0, unit.shape[0], chunk):
        sim = unit[s : s + chunk] @ unit.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -2.0
        best[s : s + chunk] = sim.max(-1).values
    return best


@torch.no_grad()
def weight_metrics(sae: SAE) -> dict[str, float]:
    """Decoder/encoder geometry: mean and max over latents of the cosine to the nearest other
    latent, and the mean cosine between each latent's encoder column and decoder row."""
    if sae.d_sae < 2:
        return {}
    dec = _max_other_cosine(sae.W_dec.detach())
    enc = _max_other_cosine(sae.W_enc.detach().T)
    out = {
        "mean_max_decoder_cosine": float(dec.mean()),
        "max_decoder_cosine": float(dec.max()),
        "mean_max_encoder_cosine": float(enc.mean()),
        "max_encoder_cosine": float(enc.max()),
    }
    if sae.d_in == sae.d_out:
        ed = F.cosine_similarity(sae.W_enc.detach().T.double(), sae.W_dec.detach().double(), dim=-1)
        out["mean_encoder_decoder_cosine"] = float(ed.mean())
    return out


@torch.no_grad()
def model_core_metrics(
    model: nn.Module,
    sae: SAE,
    token_batches: Iterable[Tensor],
    *,
    hook: str | None = None,
    hook_out: str | None = None,
    exclude_tokens: Sequence[int] | None = None,
) -> dict[str, float]:
    """:func:`core_metrics` on the activations ``model`` produces at the SAE's hooks
    (``sae.cfg.hook_name`` / ``hook_name_out`` unless given), special tokens excluded."""
    (site,) = sites(
        {
            (
                hook or sae.cfg.hook_name,
                hook_out or sae.cfg.hook_name_out or hook or sae.cfg.hook_name,
            ): sae
        }
    )
    if exclude_tokens is None:
        exclude_tokens = special_token_ids(
            getattr(model, "tokenizer", None) or getattr(model, "config", None)
        )

    def rows() -> Iterator[tuple[Tensor, Tensor | None]]:
        for tokens in token_batches:
            acts = capture(model, [site.hook_in, site.hook_out], tokens)
            keep = _keep_mask(tokens.to(acts[site.hook_in].device), exclude_tokens)
            x = acts[site.hook_in].reshape(*tokens.shape, -1)[keep]
            y = acts[site.hook_out].reshape(*tokens.shape, -1)[keep] if site.is_transcoder else None
            yield x, y

    return core_metrics(sae, rows())


@torch.no_grad()
def capture(model: nn.Module, hooks: Sequence[str], tokens: Tensor) -> dict[str, Tensor]:
    """``{hook: activation [b, s, ...]}`` of one full forward pass of ``model`` on ``tokens``."""
    store: dict[str, Tensor] = {}
    handles = []
    for hook in dict.fromkeys(hooks):
        module, is_input = resolve_hook(model, hook)
        if is_input:
            fn = lambda m, a, h=hook: store.__setitem__(h, a[0])  # noqa: E731
            handles.append(module.register_forward_pre_hook(fn))
        else:
            fn = lambda m, a, o, h=hook: store.__setitem__(h, o if isinstance(o, Tensor) else o[0])  # noqa: E731
            handles.append(module.register_forward_hook(fn))
    try:
        model_output(model, tokens.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return store

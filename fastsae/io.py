"""SAE files: SAELens v6 directories (written and read) and sparsify directories (read).

SAELens v6 layout (the fields SAELens's ``SAE.load_from_disk`` reads)::

    DIR/cfg.json                 {"architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input",
                                  "normalize_activations", "k" (topk), "d_out" (transcoders),
                                  "metadata": {"sae_lens_version": "6.x", "hook_name", ...}}
    DIR/sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out],
                                 b_dec [d_out] (+ threshold, b_gate/b_mag/r_mag, W_skip)
    DIR/sparsity.safetensors     optional; key "sparsity": log10 firing density [d_sae]

``metadata.sae_lens_version`` must be >= 6, or SAELens re-reads the file through its pre-6 path and
drops the nested metadata. fastsae also records its own view under ``metadata.fastsae`` so that a
BatchTopK SAE saved as SAELens ``jumprelu`` comes back as a BatchTopK SAE.

sparsify layout: ``DIR/cfg.json`` (``d_in``, ``num_latents`` or ``expansion_factor``, ``k``,
``activation``, ``skip_connection``, ``transcode``) and ``DIR/sae.safetensors`` with
``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec`` and optional
``W_skip``.

Only safetensors and JSON are ever read: no pickle, so loading a file runs no code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from fastsae.atomic import atomic_directory, remove_stale_temporaries
from fastsae.config import SAEConfig, dtype_from_name
from fastsae.jsonfile import read_json_object
from fastsae.tensor_file import check_header, meta_shapes, read_header, read_tensors

__all__ = [
    "SAELENS_VERSION",
    "atomic_directory",
    "load",
    "load_sparsity",
    "remove_stale_temporaries",
    "save_sae",
]

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SPARSITY = "sparsity.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"

#: Written as ``metadata.sae_lens_version``; any value >= 6.0.0 selects SAELens's v6 reader.
SAELENS_VERSION = "6.0.0"

# fastsae architecture -> SAELens architecture (SAE, transcoder, skip-transcoder).
_TO_SAELENS = {
    "topk": ("topk", None, None),
    "relu": ("standard", "transcoder", "skip_transcoder"),
    "jumprelu": ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"),
    "batchtopk": ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"),
    "matryoshka_batchtopk": ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"),
    "gated": ("gated", None, None),
}
# SAELens architecture -> (fastsae architecture, skip connection)
_FROM_SAELENS = {
    "standard": ("relu", False),
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "topk": ("topk", False),
    "jumprelu": ("jumprelu", False),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
    "gated": ("gated", False),
}


# ------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------


def _saelens_architecture(sae) -> str:
    return _saelens_architecture_of(sae.cfg)


def _saelens_architecture_of(cfg: SAEConfig) -> str:
    plain, transcoder, skip = _TO_SAELENS[cfg.architecture]
    if cfg.skip_connection:
        return skip or f"{cfg.architecture}_skip_transcoder"
    if cfg.d_out != cfg.d_in:
        return transcoder or f"{cfg.architecture}_transcoder"
    return plain


def _export_state(sae) -> dict[str, Tensor]:
    """The tensors SAELens expects for ``_saelens_architecture(sae)``."""
    state = {name: t.detach() for name, t in sae.state_dict().items()}
    if sae.cfg.architecture in ("batchtopk", "matryoshka_batchtopk"):
        threshold = state.pop("topk_threshold")
        state["threshold"] = torch.full((sae.d_sae,), float(threshold), dtype=sae.dtype)
    return {name: t.contiguous().cpu() for name, t in state.items()}


def save_sae(sae, path: str | Path, *, sparsity: Tensor | None = None) -> Path:
    """Write ``sae`` as a SAELens v6 directory at ``path`` (atomically). See the module docstring."""
    cfg: SAEConfig = sae.cfg
    if sparsity is not None and tuple(sparsity.shape) != (cfg.d_sae,):
        raise ValueError(f"sparsity has shape {tuple(sparsity.shape)}; expected ({cfg.d_sae},)")
    cfg_json: dict[str, Any] = {
        "architecture": _saelens_architecture(sae),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            **cfg.metadata,
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "hook_name": cfg.hook_name,
            "model_name": cfg.model_name,
            "fastsae": {k: v for k, v in cfg.to_dict().items() if k != "metadata"},
        },
    }
    if cfg.hook_name_out is not None:
        cfg_json["metadata"]["hook_name_out"] = cfg.hook_name_out
    if cfg.architecture == "topk":
        cfg_json["k"] = cfg.k
        cfg_json["rescale_acts_by_decoder_norm"] = False
    if cfg.d_out != cfg.d_in or cfg.skip_connection:
        cfg_json["d_out"] = cfg.d_out
    state = _export_state(sae)

    writers: dict[str, Callable[[Path], None]] = {
        WEIGHTS: lambda p: save_file(state, str(p)),
    }
    if sparsity is not None:
        sp = {"sparsity": sparsity.detach().float().contiguous().cpu()}
        writers[SPARSITY] = lambda p: save_file(sp, str(p))
    writers[CFG] = lambda p: p.write_text(json.dumps(cfg_json, indent=2))
    return atomic_directory(path, writers)


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path)


def _expected_shapes(cfg: SAEConfig, where: Path) -> dict[str, tuple[int, ...]]:
    """The tensors of a SAELens file for ``cfg``, from a meta-device SAE: nothing is allocated."""
    from fastsae.sae import SAE

    shapes = meta_shapes(lambda: SAE.from_config(cfg), str(where))
    if "topk_threshold" in shapes:  # exported as SAELens's per-latent JumpReLU threshold
        del shapes["topk_threshold"]
        shapes["threshold"] = (cfg.d_sae,)
    return shapes


def _check_agrees_with_metadata(raw: dict[str, Any], cfg: SAEConfig, path: Path) -> None:
    """The SAELens fields of a fastsae ``cfg.json`` must say what ``metadata.fastsae`` says."""
    fields: dict[str, Any] = {
        "architecture": _saelens_architecture_of(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
    }
    if "d_out" in raw or cfg.d_out != cfg.d_in or cfg.skip_connection:
        fields["d_out"] = cfg.d_out
    if cfg.architecture == "topk":
        fields["k"] = cfg.k
    for name, value in fields.items():
        if raw.get(name) != value:
            raise ValueError(
                f"{path}: {name}={raw.get(name)!r} disagrees with metadata.fastsae, which says "
                f"{value!r}; the file was edited or is corrupt"
            )


def _int_field(cfg: dict[str, Any], name: str, path: Path) -> int:
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{path}: field {name!r} must be an integer, got {value!r}")
    return value


def _load_saelens(path: Path, device: str | torch.device | None):
    from fastsae.sae import SAE

    cfg_path = path / CFG
    raw = _read_json(cfg_path)
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_path}: 'metadata' must be an object, got {type(meta).__name__}")
    meta = dict(meta)
    ours = meta.pop("fastsae", None)
    if ours is not None and not isinstance(ours, dict):
        raise ValueError(
            f"{cfg_path}: 'metadata.fastsae' must be an object, got {type(ours).__name__}"
        )
    arch = raw.get("architecture", "standard")
    if ours is not None:
        cfg = SAEConfig.from_dict({**ours, "metadata": _clean_meta(meta)})
    else:
        if arch == "topk" and raw.get("activation_fn_kwargs", {}).get("k") and "k" not in raw:
            raw["k"] = raw["activation_fn_kwargs"]["k"]  # pre-6 SAELens files
        if arch not in _FROM_SAELENS:
            raise ValueError(
                f"{cfg_path}: architecture={arch!r} is not supported; allowed: {', '.join(_FROM_SAELENS)}"
            )
        fast_arch, skip = _FROM_SAELENS[arch]
        d_in = _int_field(raw, "d_in", cfg_path)
        hook = meta.get("hook_name", raw.get("hook_name", raw.get("hook_point")))
        cfg = SAEConfig(
            architecture=fast_arch,
            d_in=d_in,
            d_sae=_int_field(raw, "d_sae", cfg_path),
            d_out=raw.get("d_out", d_in),
            k=raw.get("k") if fast_arch == "topk" else None,
            skip_connection=skip,
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            normalize_activations=raw.get("normalize_activations", "none") or "none",
            dtype=raw.get("dtype", "float32"),
            hook_name=hook,
            model_name=meta.get("model_name", raw.get("model_name")),
            metadata=_clean_meta(meta),
        )
    if ours is not None:
        _check_agrees_with_metadata(raw, cfg, cfg_path)
    weights_path = path / WEIGHTS
    # names, shapes and dtypes from the header, before the SAE is allocated
    check_header(weights_path, read_header(weights_path), _expected_shapes(cfg, cfg_path))
    sae = SAE.from_config(cfg)
    tensors = read_tensors(weights_path)
    rescale = ours is None and arch == "topk" and raw.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        tensors = _fold_decoder_norm(tensors)
    _assign(sae, tensors)
    return sae.to(device) if device is not None else sae


def _clean_meta(meta: dict[str, Any]) -> dict[str, Any]:
    skip = {
        "sae_lens_version",
        "sae_lens_training_version",
        "hook_name",
        "model_name",
        "hook_name_out",
    }
    return {k: v for k, v in meta.items() if k not in skip}


def _fold_decoder_norm(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens ``rescale_acts_by_decoder_norm``: rank latents by ``pre * ||W_dec_i||`` and decode
    with unit rows. Folding the norms into ``W_enc``/``b_enc`` gives identical outputs."""
    norms = tensors["W_dec"].norm(dim=-1).clamp(min=1e-8)
    out = dict(tensors)
    out["W_enc"] = tensors["W_enc"] * norms
    out["b_enc"] = tensors["b_enc"] * norms
    out["W_dec"] = tensors["W_dec"] / norms[:, None]
    return out


def _assign(sae, tensors: dict[str, Tensor]) -> None:
    with torch.no_grad():
        if sae.cfg.architecture in ("batchtopk", "matryoshka_batchtopk"):
            tensors = dict(tensors)
            threshold = tensors.pop("threshold")
            sae.topk_threshold.fill_(float(threshold.double().mean()))
        params = dict(sae.named_parameters())
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))


def _load_sparsify(path: Path, device: str | torch.device | None):
    from fastsae.sae import SAE

    cfg_path = path / CFG
    raw = _read_json(cfg_path)
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise ValueError(
            f"{cfg_path}: sparsify activation={activation!r} is not supported; allowed: topk"
        )
    d_in = _int_field(raw, "d_in", cfg_path)
    if raw.get("num_latents"):
        d_sae = _int_field(raw, "num_latents", cfg_path)
    else:
        d_sae = d_in * _int_field({"expansion_factor": 32, **raw}, "expansion_factor", cfg_path)
    weights_path = path / SPARSIFY_WEIGHTS
    header = read_header(weights_path)
    codes = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
    dtype = codes.get(header["W_dec"][0], "float32") if "W_dec" in header else "float32"
    cfg = SAEConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        k=raw.get("k", 32),
        skip_connection=bool(raw.get("skip_connection", False)),
        apply_b_dec_to_input=not raw.get("transcode", False),
        dtype=dtype,
    )
    expected = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    if cfg.skip_connection:
        expected["W_skip"] = (d_in, d_in)
    check_header(weights_path, header, expected)
    sae = SAE.from_config(cfg)
    tensors = read_tensors(weights_path)
    state = {
        "W_enc": tensors["encoder.weight"].T,
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    if cfg.skip_connection:
        state["W_skip"] = tensors["W_skip"]
    _assign(sae, state)
    return sae.to(device) if device is not None else sae


def load(path: str | Path, *, device: str | torch.device | None = None, dtype: str | None = None):
    """Load an SAE directory: fastsae / SAELens (``sae_weights.safetensors``) or sparsify
    (``sae.safetensors``). Returns the matching :class:`fastsae.SAE` subclass, in eval mode
    (call ``.train()`` to fine-tune a BatchTopK SAE with its batch-level selection).

    Raises:
        ValueError: a missing directory or file, a ``cfg.json`` that is not valid JSON (or nested
            too deeply), whose SAELens fields disagree with its ``metadata.fastsae``, an unknown
            architecture, or missing / extra / mis-shaped / non-float tensors, each naming the
            problem. Names, shapes and dtypes are checked from the safetensors header before the
            SAE is allocated, so a small file that declares a huge SAE costs nothing to refuse.
        TypeError: ``dtype`` is not a floating dtype.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if not (path / CFG).exists():
        raise ValueError(f"{path}: missing {CFG}")
    target_dtype = dtype_from_name(dtype) if dtype is not None else None
    if (path / WEIGHTS).exists():
        sae = _load_saelens(path, device)
    elif (path / SPARSIFY_WEIGHTS).exists():
        sae = _load_sparsify(path, device)
    else:
        raise ValueError(
            f"{path}: found no weights ({WEIGHTS} for SAELens/fastsae, {SPARSIFY_WEIGHTS} for sparsify)"
        )
    if target_dtype is not None:
        sae = sae.to(target_dtype)
        sae.cfg.dtype = str(target_dtype).removeprefix("torch.")
    # Eval mode: a BatchTopK / Matryoshka SAE then encodes each row on its own with the learned
    # threshold, as SAELens does with the same files (training mode keeps k * B of the batch).
    return sae.eval()


def load_sparsity(path: str | Path) -> Tensor | None:
    """The ``sparsity [d_sae]`` (log10 firing density) saved beside an SAE, or None."""
    file = Path(path) / SPARSITY
    if not file.exists():
        return None
    tensors = read_tensors(file)
    if set(tensors) != {"sparsity"}:
        raise ValueError(f"{file}: expected exactly one tensor 'sparsity', found {sorted(tensors)}")
    return tensors["sparsity"]

"""Analysis with SAEs: splice them into a model, read and edit features, attribute, evaluate.

- :mod:`fastsae.analysis.splice`: :class:`Splice`, a context manager over TransformerLens and
  ``transformers`` models, with an optional error term.
- :mod:`fastsae.analysis.intervene`: :class:`Ablate`, :class:`Scale`, :class:`Clamp`,
  :class:`Patch` edits applied inside a splice.
- :mod:`fastsae.analysis.codes`: sparse feature activations (:class:`SparseCodes`) via the fast
  sparse encoders.
- :mod:`fastsae.analysis.attribute`: gradient × activation attribution to a metric and between
  two spliced SAEs.
- :mod:`fastsae.analysis.metrics`: CE-loss / KL scores and SAEBench core metrics.
"""

from fastsae.analysis.attribute import attribute, feature_to_feature, logit_diff, totals
from fastsae.analysis.codes import SparseCodes, dense_to_sparse, encode_codes
from fastsae.analysis.intervene import Ablate, Clamp, Edit, Patch, Scale
from fastsae.analysis.metrics import (
    core_metrics,
    downstream_scores,
    model_core_metrics,
    special_token_ids,
    weight_metrics,
)
from fastsae.analysis.splice import (
    Site,
    Splice,
    is_transformer_lens,
    model_output,
    read_features,
    sites,
)

__all__ = [
    "Ablate",
    "Clamp",
    "Edit",
    "Patch",
    "Scale",
    "Site",
    "SparseCodes",
    "Splice",
    "attribute",
    "core_metrics",
    "downstream_scores",
    "model_core_metrics",
    "special_token_ids",
    "weight_metrics",
    "feature_to_feature",
    "logit_diff",
    "totals",
    "dense_to_sparse",
    "encode_codes",
    "is_transformer_lens",
    "model_output",
    "read_features",
    "sites",
]

"""The embedded default: a real English corpus read from an installed package
(:mod:`fastsae.demo.corpus`) and a tiny causal LM trained on it (:mod:`fastsae.demo.model`), so
that the activation pipeline runs end to end offline."""

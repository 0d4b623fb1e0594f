"""The activation pipeline: sources, text, the on-disk cache and the shuffler.

::

    from fastsae.data import ActivationCache, ActivationShuffler, sources, text

    # live: model -> shuffled batches
    opened = open_source()                         # the embedded demo model, blocks.1.hook_resid_post
    seqs = text.token_sequences(text.load_rows(), opened.tokenizer, 128)
    with ActivationShuffler.from_source(
        opened.source, text.token_batches(seqs, 32), batch_size=4096, buffer_tokens=1 << 17
    ) as batches:
        for batch in batches:
            x = batch["blocks.1.hook_resid_post"]  # [4096, 128]

    # cached: python -m fastsae.cache --tokens 1000000 --out acts/
    cache = ActivationCache("acts/")
    x = cache.read("blocks.1.hook_resid_post", 0, 4096)

See ``docs/data.md``.
"""

from fastsae.data import sources, text
from fastsae.data.cache import ActivationCache, CacheIntegrityError
from fastsae.data.models import open_source
from fastsae.data.shuffler import ActivationShuffler
from fastsae.data.sources import ActivationSource, HFSource, TransformerLensSource
from fastsae.data.writer import CacheConfig, write_cache

__all__ = [
    "ActivationCache",
    "ActivationShuffler",
    "ActivationSource",
    "CacheConfig",
    "CacheIntegrityError",
    "HFSource",
    "TransformerLensSource",
    "open_source",
    "sources",
    "text",
    "write_cache",
]

"""``python -m fastsae.cache``: write model activations to an on-disk cache.

The logic lives in :mod:`fastsae.data.writer`; ``--help`` lists every flag.
"""

from fastsae.data.writer import main

if __name__ == "__main__":
    main()

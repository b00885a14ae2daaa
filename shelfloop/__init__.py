"""ShelfLoop core: the CLI, typed settings, the edge-cloud wire contract and the synthetic retail world.

Kept import-light on purpose: `shelfloop.contract` is loaded on store devices.
"""

__version__ = "0.1.0"

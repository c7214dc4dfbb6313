"""bon-gateway: a Best-of-N reranking gateway.

Importing this package (or its api/engine/generation modules) never imports
torch: only the reward-worker process does.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"

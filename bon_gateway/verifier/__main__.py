"""`python -m bon_gateway.verifier`: assemble the verifier checkpoint (see assemble.py)."""

from __future__ import annotations

from bon_gateway.verifier.assemble import main

main()

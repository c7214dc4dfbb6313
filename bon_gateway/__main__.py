from __future__ import annotations

from bon_gateway.cli import main

if __name__ == "__main__":
    main()

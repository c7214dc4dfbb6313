"""Importing the HTTP app creates nothing. (That the front never imports torch is one
of the import-direction rules in tests/test_import_direction.py.)"""

from __future__ import annotations


def test_building_the_app_creates_nothing_at_import() -> None:
    # Two apps over two metric sets must not collide: no module-level registry or app.
    from bon_gateway.api import http_app

    assert not any(type(value).__name__ == "FastAPI" for value in vars(http_app).values())

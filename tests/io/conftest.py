"""Object-store fixtures (tests/object_stores.py) for the catalog dataset tests."""

from object_stores import s3_server, store  # noqa: F401

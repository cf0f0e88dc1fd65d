"""Object-store fixtures (tests/object_stores.py) for the streamed-source tests."""

from object_stores import s3_server, store  # noqa: F401

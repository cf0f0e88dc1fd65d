"""degradations package."""

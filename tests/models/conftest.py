"""Fixtures of the model tests: the tiny random-weight HF model folders (`tests.models.tiny`)."""
from tests.models.tiny import tiny_model  # noqa: F401

"""The real default model, loaded once per test session."""

from __future__ import annotations

import pytest

from kvtier.engine.model import Model, default_model_path


@pytest.fixture(scope="session")
def model() -> Model:
    return Model(default_model_path())

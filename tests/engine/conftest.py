"""The real default model, loaded once per test session."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.engine.model import Model, default_model_path


@pytest.fixture(scope="session")
def model() -> Model:
    return Model(default_model_path())


def document_text() -> str:
    """Long natural English that ships with Python."""
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="session")
def document_tokens(model: Model) -> np.ndarray:
    return model.tokenize(document_text()[:60_000])

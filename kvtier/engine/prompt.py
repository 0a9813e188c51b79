"""A request's prompt as tokens: the chat template or the plain prompt, after a session's history.

A session's stored tokens are reused as they are and only the new text is tokenized, so a resumed
conversation's prefix is exactly the stored one (tokenizing the whole text again could merge
tokens across the boundary and miss every stored block).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from kvtier.engine.api import ChatMessage, GenerationRequest
from kvtier.engine.model import Model


@dataclass(frozen=True, slots=True)
class History:
    """What a stored session brings to its next request (empty for a new or no session)."""

    messages: list[dict[str, str]] = field(default_factory=list)
    text: str = ""
    """The rendered text of the whole conversation so far."""
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """The tokens whose KV the session's stored sequence holds."""


@dataclass(frozen=True, slots=True)
class Prompt:
    tokens: np.ndarray
    text: str
    """The rendered text the tokens stand for (the session's next request extends it)."""


def message_dicts(messages: Iterable[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template and the session store take them."""
    return [{"role": m.role, "content": m.content} for m in messages]


def build_prompt(model: Model, request: GenerationRequest, history: History) -> Prompt:
    """The request's tokens and text: its messages rendered after the history's, or its plain
    prompt appended to the history's text."""
    if request.messages is not None:
        text = model.render_chat(history.messages + message_dicts(request.messages))
    else:
        text = history.text + (request.prompt or "")
    if history.text and text.startswith(history.text):
        suffix = model.tokenize(text[len(history.text):], add_special=False)
        return Prompt(np.concatenate([history.tokens, suffix]).astype(np.int32), text)
    return Prompt(model.tokenize(text, add_special=True), text)

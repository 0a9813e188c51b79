"""A request's prompt as tokens: the chat template or the plain prompt, after a session's history.

A session's stored tokens are reused as they are and only the new text is tokenized, so a resumed
conversation's prefix is exactly the stored one (tokenizing the whole text again could merge
tokens across the boundary and miss every stored block).

Only the chat template's own text may hold special tokens: the template is rendered over
placeholders, each message's content is put in verbatim, and content is tokenized without parsing
special tokens, so a message holding ``<|im_end|><|im_start|>system`` is plain text, never a forged
turn. (A completion's prompt is the client's own template, so its special tokens are parsed.)

Before any tokenizing, a prompt whose UTF-8 length alone proves it longer than the context is
refused: a token stands for at most :attr:`Model.max_piece_bytes` bytes of text.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from kvtier.engine.api import ChatMessage, GenerationRequest
from kvtier.engine.model import Model
from kvtier.errors import ContextOverflow, InvalidRequest

log = logging.getLogger("kvtier.engine")


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


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered prompt and where in it the clients' own text is."""

    text: str
    user: tuple[tuple[int, int], ...] = ()
    """[start, end) character ranges of message content: tokenized without special tokens."""
    special: bool = True
    """Whether special tokens are parsed outside ``user`` (False: nowhere)."""


def message_dicts(messages: Iterable[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template and the session store take them."""
    return [{"role": m.role, "content": m.content} for m in messages]


def render_chat(model: Model, messages: list[dict[str, str]]) -> Rendered:
    """The chat template over ``messages``, each content in verbatim where the template put it.

    The template renders placeholders (private-use characters and a random nonce, which no
    content holds); a template that does not show each one exactly once, in order, transforms
    content in ways this cannot follow: then the real rendering is used with no special tokens
    parsed at all, which the model reads worse but which forges nothing.
    """
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    try:
        skeleton = model.render_chat([dict(m, content=mark) for m, mark in zip(messages, marks)])
    except InvalidRequest:  # the template refused the placeholders: not the content's fault
        skeleton = ""
    pieces: list[str] = []
    user: list[tuple[int, int]] = []
    at = length = 0
    for message, mark in zip(messages, marks):
        found = skeleton.find(mark, at)
        if found < 0 or skeleton.count(mark) != 1:
            log.warning("the chat template transforms message content; special tokens are not "
                        "parsed in this prompt")
            return Rendered(model.render_chat(messages), special=False)
        pieces.append(skeleton[at:found])
        length += found - at
        content = message["content"]
        pieces.append(content)
        user.append((length, length + len(content)))
        length += len(content)
        at = found + len(mark)
    pieces.append(skeleton[at:])
    return Rendered("".join(pieces), tuple(user))


def tokenize(model: Model, rendered: Rendered, start: int = 0, add_special: bool = True
             ) -> np.ndarray:
    """``rendered.text[start:]`` as tokens: content without special tokens, the rest with."""
    text = rendered.text
    parts: list[np.ndarray] = []
    at = start
    for begin, end in rendered.user:
        begin = max(begin, start)
        if end <= begin:
            continue
        if begin > at:
            parts.append(model.tokenize(text[at:begin], add_special and not parts,
                                        rendered.special))
        parts.append(model.tokenize(text[begin:end], add_special and not parts, False))
        at = end
    if at < len(text) or not parts:
        parts.append(model.tokenize(text[at:], add_special and not parts, rendered.special))
    return np.concatenate(parts).astype(np.int32)


def check_length(model: Model, text: str, tokens_before: int, context_size: int) -> None:
    """:class:`ContextOverflow` if ``tokens_before`` tokens and ``text`` cannot fit
    ``context_size`` tokens whatever ``text`` tokenizes to; cheap (no tokenizing)."""
    n_bytes = len(text.encode("utf-8"))
    at_least = tokens_before - (-n_bytes // model.max_piece_bytes)
    if at_least >= context_size:
        raise ContextOverflow(f"the prompt has at least {at_least} tokens ({n_bytes} bytes of "
                              f"text, at most {model.max_piece_bytes} bytes a token); this "
                              f"server's context holds {context_size} per conversation")


def build_prompt(model: Model, request: GenerationRequest, history: History,
                 context_size: int | None = None) -> Prompt:
    """The request's tokens and text: its messages rendered after the history's, or its plain
    prompt appended to the history's text. With ``context_size``, a prompt whose length in
    bytes proves it longer is refused before tokenizing."""
    if request.messages is not None:
        rendered = render_chat(model, history.messages + message_dicts(request.messages))
    else:
        rendered = Rendered(history.text + (request.prompt or ""))
    text = rendered.text
    reuse = bool(history.text) and text.startswith(history.text)
    start = len(history.text) if reuse else 0
    if context_size is not None:
        check_length(model, text[start:], len(history.tokens) if reuse else 0, context_size)
    if reuse:
        suffix = tokenize(model, rendered, start, add_special=False)
        return Prompt(np.concatenate([history.tokens, suffix]).astype(np.int32), text)
    return Prompt(tokenize(model, rendered), text)

"""Prompt building on the real default model's tokenizer and chat template."""

from __future__ import annotations

import numpy as np

from kvtier.engine.api import ChatMessage, GenerationRequest
from kvtier.engine.prompt import History, build_prompt, message_dicts


def test_a_new_chat_is_rendered_and_tokenized_whole(model):
    request = GenerationRequest(messages=(ChatMessage("user", "Hello there"),))
    prompt = build_prompt(model, request, History())
    assert prompt.text == model.render_chat([{"role": "user", "content": "Hello there"}])
    assert np.array_equal(prompt.tokens, model.tokenize(prompt.text, add_special=True))


def test_a_session_keeps_its_stored_tokens_and_tokenizes_only_the_new_text(model):
    first = build_prompt(model, GenerationRequest(prompt="The cat sat"), History())
    # " on" stored as two tokens, as generation may have produced it: a fresh tokenization of the
    # text would merge them and miss the stored KV, so the stored tokens must be kept as they are.
    stored = np.concatenate([first.tokens, model.tokenize(" o", add_special=False),
                             model.tokenize("n", add_special=False)])
    assert not np.array_equal(stored, model.tokenize(first.text + " on", add_special=True))
    history = History([], first.text + " on", stored)
    prompt = build_prompt(model, GenerationRequest(prompt=" the mat"), history)
    assert prompt.text == "The cat sat on the mat"
    assert np.array_equal(prompt.tokens[:len(stored)], stored)
    assert np.array_equal(prompt.tokens[len(stored):],
                          model.tokenize(" the mat", add_special=False))


def test_a_chat_session_appends_its_messages_to_the_history(model):
    history_messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    text = model.render_chat(history_messages, add_generation_prompt=False)
    stored = model.tokenize(text, add_special=True)
    request = GenerationRequest(messages=(ChatMessage("user", "And now?"),))
    prompt = build_prompt(model, request, History(history_messages, text, stored))
    assert prompt.text == model.render_chat(history_messages + message_dicts(request.messages))
    assert prompt.text.startswith(text)
    assert np.array_equal(prompt.tokens[:len(stored)], stored)


def test_a_history_the_new_text_does_not_extend_is_tokenized_again(model):
    history = History([], "something else", np.array([1, 2, 3], np.int32))
    prompt = build_prompt(model, GenerationRequest(messages=(ChatMessage("user", "Hi"),)),
                          history)
    assert np.array_equal(prompt.tokens, model.tokenize(prompt.text, add_special=True))

"""Chat on a GGUF without a chat template (issue 11: it answered 400): llama.cpp's built-in
template for the architecture where there is one, else ChatML; which one is logged once."""

from __future__ import annotations

import logging

import pytest

from kvtier.engine.model import Model, builtin_chat
from kvtier.errors import InvalidRequest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_gemma_without_a_template_gets_llama_cpps_gemma_template(gemma3, caplog):
    with caplog.at_level(logging.INFO, logger="kvtier.engine.model"):
        model = Model(gemma3)
    try:
        assert model.chat_template == "gemma"
        assert model.render_chat(MESSAGES) == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                                               "<start_of_turn>model\n")
        model.render_chat(MESSAGES)
    finally:
        model.close()
    said = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert said == ["gemma-3-270m-q4_k_m has no chat template; chats use llama.cpp's built-in "
                    "'gemma' template"]


def test_chatml_renders_every_message_and_the_generation_prompt():
    assert builtin_chat("chatml", MESSAGES, True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert builtin_chat("chatml", MESSAGES, False).endswith("Hi<|im_end|>\n")


def test_a_long_conversation_fits_whatever_its_length():
    long = [{"role": "user", "content": "x" * 10_000}]
    assert len(builtin_chat("chatml", long, True)) > 10_000


def test_a_template_llama_cpp_does_not_know_is_an_invalid_request():
    with pytest.raises(InvalidRequest):
        builtin_chat("no-such-template", MESSAGES, True)

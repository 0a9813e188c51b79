"""A sliding-window model (Gemma 3 270M: a 512-position window in 15 of its 18 layers) on the real
engine: a session resumes after a restart exactly as an uninterrupted run, and a conversation
that shares only its first blocks with a stored one restores them exactly."""

from __future__ import annotations

from pathlib import Path

from kvtier.engine.api import ChatMessage, Finished, GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine
from tests.engine.conftest import document_text
from tests.engine.engines import make_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
DOCUMENT = document_text()[30_000:34_000]
FIRST = "Read this text.\n\n" + DOCUMENT + "\n\nWhat is it about?"   # ~1,000 tokens
SECOND = "Name one keyword from it."
BRANCH = "Read this text.\n\n" + DOCUMENT[:2_400] + "\n\nWho wrote it?"   # shares 2 blocks


def gemma_engine(data_dir: Path, model: Path) -> Engine:
    return make_engine(data_dir, **{"model.model_path": str(model), "tiers.warm_format": "f16"})


def ask(engine: Engine, text: str, session: str | None = "s") -> Finished:
    return engine.generate(GenerationRequest(messages=(ChatMessage("user", text),),
                                             sampling=GREEDY, session_id=session))


def run(data_dir: Path, model: Path, *texts: str, session: str | None = "s") -> list[Finished]:
    engine = gemma_engine(data_dir, model)
    try:
        return [ask(engine, text, session) for text in texts]
    finally:
        engine.close()


def test_a_session_resumes_after_a_restart_as_an_uninterrupted_run(tmp_path, gemma3):
    first, second = run(tmp_path / "a", gemma3, FIRST, SECOND)
    assert second.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.usage.prompt_tokens > 768   # the 512-position window had left block 0

    assert run(tmp_path / "b", gemma3, FIRST)[0].text == first.text
    resumed, = run(tmp_path / "b", gemma3, SECOND)
    branch, = run(tmp_path / "b", gemma3, BRANCH, session=None)
    assert resumed.text == second.text
    assert resumed.usage.restored_tokens == resumed.usage.cached_tokens \
        == second.usage.cached_tokens
    assert resumed.usage.prefill_tokens == second.usage.prefill_tokens

    # A conversation that branches off FIRST within its first blocks: they restore exactly,
    # because the store read each block's window rows while llama.cpp still held them.
    fresh, = run(tmp_path / "c", gemma3, BRANCH, session=None)
    assert branch.text == fresh.text
    assert branch.usage.cached_tokens == branch.usage.restored_tokens == 512
    assert branch.usage.prefill_tokens == branch.usage.prompt_tokens - 512

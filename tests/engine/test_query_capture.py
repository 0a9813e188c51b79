"""Queries captured through llama.cpp's eval callback, on the real default model."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import llama_cpp
import numpy as np
import pytest

from kvtier.engine.model import Model
from kvtier.engine.query_capture import QueryCapture, RowRange, rope_op

N_TOKENS = 64


class _Context:
    """A bare llama.cpp context with (or without) an eval callback."""

    def __init__(self, model: Model, callback: ctypes._CFuncPtr | None,
                 user_data: ctypes.c_void_p | None) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 512, 128, 128, 1
        params.n_threads = params.n_threads_batch = 2
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if callback is not None:
            params.cb_eval, params.cb_eval_user_data = callback, user_data
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        self.n_vocab = model.n_vocab
        self.batch = llama_cpp.llama_batch_init(128, 0, 1)

    def decode(self, tokens: np.ndarray, first_position: int) -> np.ndarray:
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ptr), 0, -1, -1)
        for i, token in enumerate(tokens):
            self.batch.token[i], self.batch.pos[i] = int(token), first_position + i
            self.batch.n_seq_id[i], self.batch.seq_id[i][0], self.batch.logits[i] = 1, 0, False
        self.batch.logits[len(tokens) - 1] = True
        self.batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(self.ptr, self.batch) == 0
        logits = llama_cpp.llama_get_logits_ith(self.ptr, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ptr)


class _PythonCapture:
    """An independent reference: the same capture as a plain ctypes callback."""

    def __init__(self, model: Model, first: int, count: int) -> None:
        from llama_cpp._ggml import libggml
        self.get = libggml.ggml_backend_tensor_get
        self.get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.name = libggml.ggml_get_name
        self.name.restype, self.name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        self.first, self.count, self.rope = first, count, rope_op()
        self.head_dim = model.n_embd // model.n_head
        self.n_head = model.n_head
        self.rows: dict[int, np.ndarray] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._callback)

    def _callback(self, tensor: int, ask: bool, _: int) -> bool:
        name = self.name(tensor).decode()
        op = ctypes.c_int32.from_address(tensor + 80).value
        if not (name.startswith("Qcur-") and name[5:].isdigit() and op == self.rope):
            return False
        if ask:
            return True
        stride = ctypes.c_size_t.from_address(tensor + 48 + 16).value
        out = np.empty((self.count, self.n_head, self.head_dim), np.float32)
        self.get(tensor, out.ctypes.data, stride * self.first, stride * self.count)
        self.rows[int(name[5:])] = out
        return True


@pytest.fixture(scope="module")
def tokens(document_tokens: np.ndarray) -> np.ndarray:
    return document_tokens[:N_TOKENS]


@pytest.fixture(scope="module")
def capture(model: Model) -> Iterator[tuple[QueryCapture, _Context]]:
    qc = QueryCapture(model.n_layer, model.n_head, model.n_embd // model.n_head)
    ctx = _Context(model, qc.callback, qc.user_data)
    yield qc, ctx
    ctx.close()


def test_captures_what_a_plain_callback_sees(model: Model, tokens: np.ndarray,
                                             capture: tuple[QueryCapture, _Context]) -> None:
    qc, ctx = capture
    qc.arm([RowRange(N_TOKENS - 4, 4), RowRange(3, 2)])
    ctx.decode(tokens, 0)
    last, early = qc.collect()
    assert last.shape == (model.n_layer, 4, model.n_head, model.n_embd // model.n_head)
    assert early.shape[1] == 2
    for first, count, got in ((N_TOKENS - 4, 4, last), (3, 2, early)):
        reference = _PythonCapture(model, first, count)
        other = _Context(model, reference.callback, None)
        other.decode(tokens, 0)
        other.close()
        assert sorted(reference.rows) == list(range(model.n_layer))
        np.testing.assert_array_equal(got, np.stack([reference.rows[i]
                                                     for i in range(model.n_layer)]))


def test_queries_are_taken_after_rope(model: Model, tokens: np.ndarray,
                                      capture: tuple[QueryCapture, _Context]) -> None:
    qc, ctx = capture
    rows = []
    for position in (0, 100):
        qc.arm([RowRange(0, 1)])
        ctx.decode(tokens[:1], position)
        rows.append(qc.collect()[0][0, 0])      # layer 0: no context, only the position differs
    assert not np.allclose(rows[0], rows[1])
    np.testing.assert_allclose(np.linalg.norm(rows[0]), np.linalg.norm(rows[1]), rtol=1e-3)


def test_capture_off_changes_nothing(model: Model, tokens: np.ndarray,
                                     capture: tuple[QueryCapture, _Context]) -> None:
    _, ctx = capture
    plain = _Context(model, None, None)
    expected = plain.decode(tokens, 0)
    plain.close()
    np.testing.assert_array_equal(ctx.decode(tokens, 0), expected)


def test_layer_sampling(model: Model, tokens: np.ndarray) -> None:
    qc = QueryCapture(model.n_layer, model.n_head, model.n_embd // model.n_head, layer_stride=4)
    ctx = _Context(model, qc.callback, qc.user_data)
    try:
        qc.arm([RowRange(0, 2)])
        ctx.decode(tokens, 0)
        (queries,) = qc.collect()
    finally:
        ctx.close()
    assert qc.layers == list(range(0, model.n_layer, 4))
    assert queries.shape[0] == len(qc.layers)


def test_bad_ranges_are_refused(capture: tuple[QueryCapture, _Context]) -> None:
    qc, _ = capture
    with pytest.raises(ValueError):
        qc.arm([])

"""The attention that bench/attention_rank.py recomputes from captured queries and stored keys is
the attention llama.cpp computed: its own ``kq_soft_max`` tensors, on the real default model."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from bench import attention_rank as ar
from bench.common import document_tokens
from kvtier.engine import state_codec as sc
from kvtier.engine.model import Model
from kvtier.engine.query_capture import QueryCapture, RowRange

N_TOKENS = 48
LAYERS = (0, 13, 29)


class _SoftmaxCapture:
    """A plain ctypes eval callback that copies ``kq_soft_max-<layer>`` out (non-flash attention
    names its attention weights so), chained after the query capture's."""

    def __init__(self, queries: QueryCapture) -> None:
        from llama_cpp._ggml import libggml
        self.get = libggml.ggml_backend_tensor_get
        self.get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.name = libggml.ggml_get_name
        self.name.restype, self.name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        self.queries = queries
        self.weights: dict[int, np.ndarray] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._callback)

    def _callback(self, tensor: int, ask: bool, _: int) -> bool:
        name = self.name(tensor).decode()
        if not (name.startswith("kq_soft_max-") and int(name.split("-")[1]) in LAYERS):
            return bool(self.queries.callback(tensor, ask, self.queries.user_data))
        if ask:
            return True
        ne = [ctypes.c_int64.from_address(tensor + 16 + 8 * i).value for i in range(4)]
        out = np.empty(ne[::-1], np.float32)           # (1, head, query, key cell)
        self.get(tensor, out.ctypes.data, 0, out.nbytes)
        self.weights[int(name.split("-")[1])] = out[0]
        return True


def test_recomputed_attention_is_llama_cpps(model: Model) -> None:
    queries = QueryCapture(model.n_layer, model.n_head, model.head_dim_k)
    softmax = _SoftmaxCapture(queries)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 256, 64, 64, 1
    params.n_threads = params.n_threads_batch = 2
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.cb_eval, params.cb_eval_user_data = softmax.callback, None
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    batch = llama_cpp.llama_batch_init(64, 0, 1)
    try:
        tokens = document_tokens(model, 4000)[:N_TOKENS]
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), i, 1, False
            batch.seq_id[i][0] = 0
        batch.logits[N_TOKENS - 1] = True
        batch.n_tokens = N_TOKENS
        queries.arm([RowRange(0, N_TOKENS)])
        assert llama_cpp.llama_decode(ctx, batch) == 0
        q = queries.collect()[0]
        blocks = sc.split_blocks(sc.parse(sc.read_state(ctx, 0)), 256)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    keys = ar.window_keys(blocks)
    assert sorted(softmax.weights) == list(LAYERS)
    for layer in LAYERS:
        ours = ar.attention_weights(q[layer], keys[layer])            # (query, head, key)
        theirs = softmax.weights[layer][:, :, :N_TOKENS].transpose(1, 0, 2)
        np.testing.assert_allclose(ours, theirs, atol=2e-3)
        # The other grouping of query heads onto KV heads would not match.
        h = np.arange(model.n_head)
        swapped = ar.attention_weights(q[layer][:, (h % 3) * 3 + h // 3], keys[layer])
        assert np.abs(swapped - theirs).max() > 0.05

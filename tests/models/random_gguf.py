"""Tiny random-weight GGUFs of architectures no small PyPI package ships, written with the
``gguf`` package and the default model's tokenizer: what llama.cpp does with a model's KV (its
shapes, its memory type) does not depend on the weights' values."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from bench.gpu.make_model import plain_value
from kvtier.engine.model import default_model_path


def _writer(path: Path, arch: str) -> tuple[GGUFWriter, int]:
    """A writer with the default model's tokenizer (no chat template): (writer, n_vocab)."""
    writer = GGUFWriter(str(path), arch)
    n_vocab = 0
    for name, field in GGUFReader(default_model_path()).fields.items():
        if not name.startswith("tokenizer.") or name == "tokenizer.chat_template":
            continue
        value = plain_value(field.contents())
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, field.types[0])
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    return writer, n_vocab


class _Tensors:
    def __init__(self, writer: GGUFWriter) -> None:
        self.writer = writer
        self.rng = np.random.default_rng(0)

    def f16(self, name: str, *shape: int, scale: float = 0.02) -> None:
        values = self.rng.standard_normal(shape, dtype=np.float32) * scale
        self.writer.add_tensor(name, values.astype(np.float16))

    def f32(self, name: str, *shape: int, value: float | None = None) -> None:
        values = np.full(shape, value, np.float32) if value is not None \
            else self.rng.standard_normal(shape, dtype=np.float32) * 0.02
        self.writer.add_tensor(name, values)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_qwen2(path: Path, n_layer: int = 2, n_embd: int = 128, n_head: int = 8,
                n_head_kv: int = 2, n_ff: int = 256, arch: str = "qwen2") -> Path:
    """A Qwen2-architecture GGUF (attention with q/k/v biases), 4 query heads per KV head; with
    ``arch="qwen2vl"``, Qwen2-VL's text model, whose positions are M-RoPE."""
    writer, n_vocab = _writer(path, arch)
    head_dim = n_embd // n_head
    if arch == "qwen2vl":
        writer.add_rope_dimension_sections([head_dim // 4, head_dim // 8, head_dim // 8, 0])
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    t = _Tensors(writer)
    t.f16("token_embd.weight", n_vocab, n_embd)
    t.f32("output_norm.weight", n_embd, value=1.0)
    for i in range(n_layer):
        p = f"blk.{i}."
        t.f32(p + "attn_norm.weight", n_embd, value=1.0)
        t.f16(p + "attn_q.weight", n_embd, n_embd)
        t.f32(p + "attn_q.bias", n_embd)
        t.f16(p + "attn_k.weight", n_head_kv * head_dim, n_embd)
        t.f32(p + "attn_k.bias", n_head_kv * head_dim)
        t.f16(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        t.f32(p + "attn_v.bias", n_head_kv * head_dim)
        t.f16(p + "attn_output.weight", n_embd, n_embd)
        t.f32(p + "ffn_norm.weight", n_embd, value=1.0)
        t.f16(p + "ffn_gate.weight", n_ff, n_embd)
        t.f16(p + "ffn_up.weight", n_ff, n_embd)
        t.f16(p + "ffn_down.weight", n_embd, n_ff)
    _finish(writer)
    return path


def write_mamba(path: Path, n_layer: int = 2, n_embd: int = 64) -> Path:
    """A Mamba-architecture GGUF: recurrent memory, no attention KV at all."""
    writer, n_vocab = _writer(path, "mamba")
    d_inner, d_state, d_conv, dt_rank = 2 * n_embd, 16, 4, 8
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(dt_rank)
    writer.add_layer_norm_rms_eps(1e-5)
    t = _Tensors(writer)
    t.f16("token_embd.weight", n_vocab, n_embd)
    t.f32("output_norm.weight", n_embd, value=1.0)
    for i in range(n_layer):
        p = f"blk.{i}."
        t.f32(p + "attn_norm.weight", n_embd, value=1.0)
        t.f16(p + "ssm_in.weight", 2 * d_inner, n_embd)
        t.f32(p + "ssm_conv1d.weight", d_inner, d_conv)
        t.f32(p + "ssm_conv1d.bias", d_inner)
        t.f16(p + "ssm_x.weight", dt_rank + 2 * d_state, d_inner)
        t.f16(p + "ssm_dt.weight", d_inner, dt_rank)
        t.f32(p + "ssm_dt.bias", d_inner)
        t.f32(p + "ssm_a", d_inner, d_state, value=-1.0)
        t.f32(p + "ssm_d", d_inner, value=1.0)
        t.f16(p + "ssm_out.weight", n_embd, d_inner)
    _finish(writer)
    return path

"""Random-weight llama GGUFs of real shapes with the default model's tokenizer, for GPU benchmarks.

Speed and memory do not depend on the weights' values, and no model hub can be reached from the
GPU machine, so the benchmarks run on a llama-architecture GGUF of a real shape (Llama 3.2 1B,
Llama 3.1 8B) whose tensors are slices of one shared random pool (seconds instead of minutes).

    python -m bench.gpu.make_model vocab OUT.gguf           # here: the tokenizer alone (~2 MB)
    python -m bench.gpu.make_model model VOCAB.gguf OUT.gguf --shape 8b
"""

from __future__ import annotations

import argparse
import time
import zlib

import numpy as np

SHAPES = {
    # n_layer, n_embd, n_head, n_head_kv, n_ff
    "tiny": (2, 256, 4, 2, 512),       # a check that the script works, anywhere
    "1b": (16, 2048, 32, 8, 8192),
    "8b": (32, 4096, 32, 8, 14336),
}


def plain_value(value):
    """A GGUF field's contents as plain Python values (strings decoded, numpy scalars unwrapped),
    as GGUFWriter takes them."""
    if isinstance(value, (list, tuple)):
        return [plain_value(x) for x in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="surrogateescape")
    return value.item() if hasattr(value, "item") else value


def _copy_fields(reader, writer, keep) -> int:
    from gguf import GGUFValueType
    n_vocab = 0
    for name, field in reader.fields.items():
        if not keep(name):
            continue
        kind, value = field.types[0], plain_value(field.contents())
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(name, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, kind)
    return n_vocab


def make_vocab(out: str) -> None:
    from gguf import GGUFReader, GGUFWriter

    from kvtier.engine.model import default_model_path
    writer = GGUFWriter(out, "llama")
    _copy_fields(GGUFReader(str(default_model_path())), writer,
                 lambda name: name.startswith("tokenizer."))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_model(vocab: str, out: str, shape: str, context: int) -> None:
    import gguf
    from gguf import GGUFReader, GGUFWriter
    n_layer, n_embd, n_head, n_head_kv, n_ff = SHAPES[shape]
    start = time.perf_counter()
    writer = GGUFWriter(out, "llama")
    n_vocab = _copy_fields(GGUFReader(vocab), writer, lambda name: name.startswith("tokenizer."))
    head_dim = n_embd // n_head
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    pool_n = max(n_vocab * n_embd, n_ff * n_embd, n_embd * n_embd) + (1 << 22)
    rng = np.random.default_rng(0)
    pool = np.empty(pool_n, dtype=np.float16)
    for i in range(0, pool_n, 1 << 26):
        pool[i:i + (1 << 26)] = rng.standard_normal(min(1 << 26, pool_n - i),
                                                    dtype=np.float32) * 0.02

    def tensor(name: str, *dims: int) -> None:
        n = int(np.prod(dims))
        offset = zlib.crc32(name.encode()) % (pool_n - n + 1)
        writer.add_tensor(name, pool[offset:offset + n].reshape(dims))

    def ones(name: str, n: int) -> None:
        writer.add_tensor(name, np.ones(n, dtype=np.float32))

    tensor("token_embd.weight", n_vocab, n_embd)
    ones("output_norm.weight", n_embd)
    tensor("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", n_embd)
        tensor(p + "attn_q.weight", n_embd, n_embd)
        tensor(p + "attn_k.weight", n_head_kv * head_dim, n_embd)
        tensor(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        tensor(p + "attn_output.weight", n_embd, n_embd)
        ones(p + "ffn_norm.weight", n_embd)
        tensor(p + "ffn_gate.weight", n_ff, n_embd)
        tensor(p + "ffn_up.weight", n_ff, n_embd)
        tensor(p + "ffn_down.weight", n_embd, n_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"{out}: {shape}, {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    vocab = sub.add_parser("vocab")
    vocab.add_argument("out")
    model = sub.add_parser("model")
    model.add_argument("vocab")
    model.add_argument("out")
    model.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    model.add_argument("--context", type=int, default=131072)
    args = parser.parse_args()
    if args.command == "vocab":
        make_vocab(args.out)
    else:
        make_model(args.vocab, args.out, args.shape, args.context)


if __name__ == "__main__":
    main()

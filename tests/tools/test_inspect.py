import numpy as np
import pytest

from kvtier.cli import main
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId
from kvtier.storage.tiers import Tier
from kvtier.storage.view import block_name
from kvtier.tools.store import parse_block
from tests.factories import NS, block_id, f16, make_layers
from tests.tools.stores import (BLOCK_TOKENS, FULL_BLOCKS, N_LAYERS, N_SESSIONS, NS2,
                                SHARED_BLOCKS, TAIL_TOKENS, expected_blocks, session_id,
                                store_config)

SESSION_TOKENS = FULL_BLOCKS * BLOCK_TOKENS + TAIL_TOKENS


def test_summary_counts_what_was_stored(cli, built):
    data = cli.json("inspect")
    assert data["totals"] == {
        "blocks": expected_blocks(), "sequences": N_SESSIONS + 1, "unnamed_sequences": 1,
        "sessions": N_SESSIONS, "namespaces": 2,
        "stored_bytes": data["totals"]["stored_bytes"], "disk_bytes": data["totals"]["disk_bytes"]}
    assert {t["name"]: t["blocks"] for t in data["tiers"]} == built.tiers
    assert all(built.tiers[t.label] > 0 for t in Tier), "blocks in every tier"
    for tier in data["tiers"]:
        assert tier["stored_bytes"] <= tier["budget"]
        assert tier["disk_bytes"] > 0
    warm, cool, _ = data["tiers"]
    assert cool["compression_ratio"] > warm["compression_ratio"] > 1.0    # Q4+zstd vs Q8

    by_ns = {n["namespace"]: n for n in data["namespaces"]}
    main = by_ns[NS.hex()]
    assert (main["fingerprint"], main["models"]) == ({"model": "test-model"}, ["test-model"])
    assert (main["sessions"], main["sequences"], main["tokens"], main["blocks"]) == (
        N_SESSIONS, N_SESSIONS, N_SESSIONS * SESSION_TOKENS, expected_blocks() - 2)
    other = by_ns[NS2.hex()]
    assert (other["fingerprint"], other["sessions"], other["sequences"], other["blocks"]) == (
        "", 0, 1, 2)

    sharing = data["sharing"]
    assert sharing["shared_blocks"] == SHARED_BLOCKS
    assert sharing["block_references"] == N_SESSIONS * (FULL_BLOCKS + 1) + 2
    assert sharing["saved_tokens"] == SHARED_BLOCKS * BLOCK_TOKENS * (N_SESSIONS - 1)
    assert sharing["saved_bytes"] == sharing["unshared_bytes"] - sharing["stored_bytes"] > 0


def test_summary_text(cli):
    code, out, _ = cli("inspect", "summary")
    assert code == 0
    for word in ("warm", "cool", "cold", "total", "shared prefixes", NS.hex()[:8]):
        assert word in out


def test_sessions_lists_every_session_most_recent_first(cli, built):
    rows = cli.json("inspect", "sessions")
    assert [r["session_id"] for r in rows] == [session_id(i) for i in range(1, N_SESSIONS + 1)]
    for i, row in enumerate(rows, start=1):
        seq = built.sequences[session_id(i)]
        assert (row["sequence"], row["tokens"], row["messages"], row["model"]) == (
            seq, SESSION_TOKENS, 2, "test-model")
        assert row["last_used"] == pytest.approx(built.built_at - 5 * 86400 * (i - 1))
        blocks = [block_id(1, b) for b in range(SHARED_BLOCKS)] \
            + [block_id(seq, b) for b in range(SHARED_BLOCKS, FULL_BLOCKS + 1)]
        expected = {t.label: 0 for t in Tier}
        for b in blocks:
            expected[built.placement[b].label] += 1
        assert row["blocks"] == {**expected, "missing": 0}


def test_session_shows_messages_and_where_each_block_lives(cli, built):
    data = cli.json("inspect", "session", session_id(3))
    assert data["data"]["messages"] == [{"role": "user", "content": "question 3"},
                                        {"role": "assistant", "content": "answer 3"}]
    seq = built.sequences[session_id(3)]
    blocks = data["block_list"]
    assert [b["block"] for b in blocks] == (
        [block_name(block_id(1, b)) for b in range(SHARED_BLOCKS)]
        + [block_name(block_id(seq, b)) for b in range(SHARED_BLOCKS, FULL_BLOCKS + 1)])
    assert [b["refs"] for b in blocks] == [N_SESSIONS] * SHARED_BLOCKS + [1] * 3
    assert [b["full"] for b in blocks] == [True] * FULL_BLOCKS + [False]
    assert [b["tokens"] for b in blocks] == [BLOCK_TOKENS] * FULL_BLOCKS + [TAIL_TOKENS]
    placement = {block_name(b): t.label for b, t in built.placement.items()}
    assert all(b["tier"] == placement[b["block"]] for b in blocks)

    code, out, _ = cli("inspect", "session", session_id(3))
    assert code == 0 and "[user] question 3" in out and "[assistant] answer 3" in out


def test_unknown_session_fails_clearly(cli):
    code, _, err = cli("inspect", "session", "nope")
    assert code == 1 and "no session 'nope'" in err
    code, _, err = cli("inspect", "session")
    assert code == 2 and "needs a session ID" in err


def test_block_filters(cli, built):
    rows = cli.json("inspect", "blocks")
    assert len(rows) == expected_blocks()
    for name in (t.label for t in Tier):
        rows = cli.json("inspect", "blocks", "--tier", name)
        assert len(rows) == built.tiers[name]
        assert {r["tier"] for r in rows} <= {name}
    rows = cli.json("inspect", "blocks", "--session", session_id(2))
    seq = built.sequences[session_id(2)]
    assert [(r["sequence"], r["index"]) for r in rows] == (
        [(1, b) for b in range(SHARED_BLOCKS)] + [(seq, b) for b in range(2, FULL_BLOCKS + 1)])
    assert len(cli.json("inspect", "blocks", "--sequence", str(seq))) == FULL_BLOCKS + 1
    rows = cli.json("inspect", "blocks", "--namespace", NS2.hex()[:6])
    assert [(r["sequence"], r["index"]) for r in rows] == [
        (built.unnamed.sequence, 0), (built.unnamed.sequence, 1)]
    assert len(cli.json("inspect", "blocks", "--limit", "3")) == 3
    first = cli.json("inspect", "blocks", "--session", session_id(1), "--tier", "warm")
    assert all(r["tier"] == "warm" for r in first)


def test_block_header_and_statistics(cli, built):
    seq = built.sequences[session_id(N_SESSIONS)]
    block = block_id(seq, 2)
    original = make_layers(100 * seq + 2, N_LAYERS)
    data = cli.json("inspect", "blocks", "--block", f"{seq}:2", "--layer", "1",
                    "--quant-error")
    assert len(data) == 1 and data[0]["block"] == block_name(block)
    assert data[0]["tier"] == built.placement[block].label
    (layer,) = data[0]["layers"]
    assert layer["layer"] == 1
    header = layer["header"]
    assert header["n_tokens"] == BLOCK_TOKENS
    assert header["k"]["type"] == header["v"]["type"] == "f16"
    # Values per channel in every tier's default: q8c in warm, q6q4 in cool and cold.
    assert header["k"]["grouping"] == header["v"]["grouping"] == "per_channel"
    assert header["key_summary"]["channels"] == original[1].k.row_bytes // 2
    for name, rows in (("k", original[1].k), ("v", original[1].v)):
        values = f16(rows)
        stats = layer[name]
        tolerance = 0.02 * float(np.abs(values).max())    # quantized (Q8 or Q4) in its tier
        assert stats["min"] == pytest.approx(values.min(), abs=tolerance)
        assert stats["max"] == pytest.approx(values.max(), abs=tolerance)
        assert stats["mean"] == pytest.approx(values.mean(), abs=tolerance)
        assert stats["nonfinite"] == 0
    errors = layer["quant_error"]
    assert errors["q4"]["k"]["rms"] > errors["q8"]["k"]["rms"] >= 0

    data = cli.json("inspect", "blocks", "--session", session_id(1), "--stats")
    assert len(data) == FULL_BLOCKS + 1
    assert all(len(b["layers"]) == N_LAYERS for b in data)
    code, out, _ = cli("inspect", "blocks", "--block", f"{seq}:2")
    assert code == 0 and "K MIN/MAX/MEAN" in out


def test_block_ids_parse_with_or_without_namespace():
    namespaces = {bytes(NS), bytes(NS2)}
    assert parse_block(f"{NS.hex()[:4]}:3:1", namespaces) == BlockId(NS, 3, 1)
    with pytest.raises(ValueError, match="2 namespaces"):
        parse_block("3:1", namespaces)
    assert parse_block("3:1", {bytes(NS)}) == BlockId(NS, 3, 1)
    assert parse_block("3:1", namespaces, {BlockId(NS2, 3, 1)}) == BlockId(NS2, 3, 1)
    with pytest.raises(ValueError, match="expected"):
        parse_block("3", namespaces)


def test_unknown_block_fails_clearly(cli):
    code, _, err = cli("inspect", "blocks", "--block", f"{NS.hex()[:8]}:1:99")
    assert code == 1 and "no block" in err


def test_a_held_store_is_refused(built, cli):
    with TierManager(store_config(built.path), background=False):
        for command in (("inspect",), ("inspect", "verify"), ("compact",)):
            code, out, err = cli(*command)
            assert code == 3, command
            assert "in use by pid" in err and "stop it first" in err
            assert out == ""


def test_a_directory_without_a_store_is_refused(tmp_path, capsys):
    for command in (["inspect"], ["compact"]):
        code = main([*command, "--data-dir", str(tmp_path / "nothing")])
        assert code == 1
        assert "no kvtier store at" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()

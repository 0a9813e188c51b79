"""The ``inspect`` and ``compact`` parsers."""

import subprocess
import sys

from kvtier.cli import build_parser


def test_views_and_flags_parse():
    parser = build_parser()
    args = parser.parse_args(["inspect", "--data-dir", "/d", "blocks", "--tier", "cool",
                              "--layer", "1", "--layer", "3", "--json"])
    assert (args.view, args.data_dir, args.tier, args.layer, args.json) == (
        "blocks", "/d", "cool", [1, 3], True)
    args = parser.parse_args(["inspect", "session", "abc", "--full"])
    assert (args.view, args.ident, args.full) == ("session", "abc", True)
    assert parser.parse_args(["inspect"]).view == "summary"
    args = parser.parse_args(["compact", "--max-age", "30d", "--keep", "5", "--dry-run"])
    assert (args.max_age, args.keep, args.dry_run) == ("30d", 5, True)


def test_building_the_parser_imports_nothing_heavy():
    """``kvtier serve`` builds the same parser and must be free to load llama.cpp first."""
    code = ("import sys; from kvtier.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('numpy', 'lmdb', 'rocksdict', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

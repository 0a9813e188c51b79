"""The HTTP↔engine boundary module: light to import, and session ids checked in one place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.engine.api import check_session_id
from kvtier.errors import InvalidRequest


def test_the_boundary_imports_no_llama_cpp_numba_or_stores():
    # The HTTP layer imports these at start-up; llama.cpp, numba and the stores load with the
    # engine, and a schema or an OpenAPI document must not wait for them.
    code = ("import sys, kvtier.engine.api, kvtier.http.schemas\n"
            "heavy = {'llama_cpp', 'numba', 'lmdb', 'rocksdict'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("session_id", ["a", "A-b_9", "x" * 128])
def test_good_session_ids_pass(session_id):
    assert check_session_id(session_id) == session_id


@pytest.mark.parametrize("session_id", ["", "../etc", "a/b", "a b", "x" * 129, "é", 7])
def test_bad_session_ids_name_the_field(session_id):
    with pytest.raises(InvalidRequest) as caught:
        check_session_id(session_id)
    assert caught.value.param == "session_id"

"""The curl examples of README.md and docs/http.md, sent as written to a real server.

Each ``curl`` command in a ``sh`` block is parsed (``-X``, ``-H``, ``-d``, ``| grep``), its
``http://127.0.0.1:8080`` replaced by the test server's address, and sent in the order the docs
give them (the session examples build on each other). A doc example that stops working fails
here.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.http.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/http.md")
DOC_URL = "http://127.0.0.1:8080"


@dataclass
class Curl:
    source: str
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    grep: str | None = None


def curl_commands(doc: str) -> list[Curl]:
    """Every curl command in the ``sh`` blocks of ``doc``, continuation lines joined."""
    text = (ROOT / doc).read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("curl "):
                commands.append(parse(line))
    return commands


def parse(line: str) -> Curl:
    command, _, pipe = line.partition(" | ")
    args = shlex.split(command)[1:]
    curl = Curl(line, "GET", "")
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-X", "-H", "-d"):
            value = args[i + 1]
            i += 1
            if arg == "-X":
                curl.method = value
            elif arg == "-H":
                name, _, header = value.partition(":")
                curl.headers[name.strip()] = header.strip()
            else:
                curl.body = value
                curl.method = "POST" if curl.method == "GET" else curl.method
        elif arg.startswith("http"):
            curl.url = arg
        elif not arg.startswith("-"):
            raise AssertionError(f"unexpected argument {arg!r} in {line!r}")
        i += 1
    if pipe:
        grep = shlex.split(pipe)
        assert grep[0] == "grep", line
        curl.grep = grep[1]
    if curl.body is not None:
        curl.headers.setdefault("Content-Type", "application/x-www-form-urlencoded")  # curl's
    return curl


def test_the_docs_have_the_promised_examples() -> None:
    commands = [c for doc in DOCS for c in curl_commands(doc)]
    bodies = [json.loads(c.body) for c in commands if c.body and c.body.startswith("{")]
    assert any(b.get("model") == "local" for b in bodies)
    assert any(b.get("stream") for b in bodies)
    paths = {c.url.removeprefix(DOC_URL).partition("?")[0] for c in commands}
    assert {"/health", "/v1/cache/stats", "/v1/chat/completions"} <= paths


@pytest.mark.parametrize("doc", DOCS)
def test_curl_examples_work_as_written(server: Server, doc: str) -> None:
    commands = curl_commands(doc)
    assert commands
    for curl in commands:
        assert curl.url.startswith(DOC_URL), curl.source
        headers = {k: v for k, v in curl.headers.items()
                   if not (k == "Authorization" and "$" in v)}   # the server has no key
        raw = curl.body.encode() if curl.body is not None else None
        status, got, body = server.request(curl.method, curl.url.removeprefix(DOC_URL),
                                           headers=headers, raw=raw)
        assert status == 200, (curl.source, body[:500])
        if curl.grep is not None:
            assert curl.grep in body.decode(), curl.source
        elif got["Content-Type"].startswith("text/event-stream"):
            events = body.decode().strip().split("\n\n")
            assert events[-1] == "data: [DONE]", curl.source
            chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
            assert all(c["model"] == server_model(server) for c in chunks)
        else:
            answer = json.loads(body)
            if "model" in (json.loads(curl.body) if curl.body else {}):
                assert answer["model"] == server_model(server), curl.source


def server_model(server: Server) -> str:
    return server.json("GET", "/v1/models")[1]["data"][0]["id"]

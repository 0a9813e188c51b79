"""kvtier's OpenAI-compatible HTTP API (aiohttp): see docs/http.md."""

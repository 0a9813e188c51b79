"""Token sampling with llama.cpp's sampler chain, one chain per generation."""

from __future__ import annotations

import random

import llama_cpp
import numpy as np

from kvtier.engine.api import SamplingParams


class Sampler:
    """penalties → top-k → top-p → min-p → temperature → draw (or greedy at temperature 0)."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.params = params
        self.ptr = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        p = params
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            add(llama_cpp.llama_sampler_init_penalties(
                n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty,
                p.presence_penalty))
        if p.temperature <= 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(p.temperature))
        seed = p.seed if p.seed is not None else random.getrandbits(32)
        add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def accept_prompt(self, tokens: np.ndarray) -> None:
        """Feed the prompt's tail to the penalties, as llama.cpp's server does."""
        if self.params.repeat_penalty != 1.0 or self.params.frequency_penalty \
                or self.params.presence_penalty:
            for t in tokens[-self.params.penalty_last_n:]:
                llama_cpp.llama_sampler_accept(self.ptr, int(t))

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        """Sample from the logits of batch output ``index``; the token is accepted."""
        return int(llama_cpp.llama_sampler_sample(self.ptr, ctx, index))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None

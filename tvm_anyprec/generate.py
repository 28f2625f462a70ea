"""Generation as users of llama.cpp and transformers expect it: sampling options, stop strings, streaming
text, timings, and chat on the tokenizer's own template with the KV cache kept across turns.

``Generation`` streams one reply: ``for piece in gen: ...`` yields text as it is decoded (a piece that could be
the start of a stop string is held back until it is not), then ``gen.stats`` holds the counts and times and
``gen.finish_reason`` is "stop" (EOS or a stop string) or "length". ``stop()`` ends it early (a client that
went away). ``Conversation`` holds the token ids its cache holds: each turn feeds only what the cache lacks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .sampling import Sampler, SamplingParams, find_stop, holdback


@dataclass
class Stats:
    prompt_tokens: int = 0        # tokens fed this call (a chat turn: the new ones only)
    cached_tokens: int = 0        # tokens reused from the KV cache
    prompt_s: float = 0.0
    generated_tokens: int = 0
    generated_s: float = 0.0
    bits: list = field(default_factory=list)

    def line(self) -> str:
        """A timing line in llama.cpp's manner."""
        def rate(n, s):
            return f"{n} tokens in {s * 1e3:.1f} ms ({n / s:.1f} tokens/s)" if s > 0 and n else f"{n} tokens"
        cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
        bits = ",".join(str(b) for b in sorted(set(self.bits))) or "-"
        return (f"prompt: {rate(self.prompt_tokens, self.prompt_s)}{cached} | generated: "
                f"{rate(self.generated_tokens, self.generated_s)} | {bits}-bit")

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "prompt_ms": self.prompt_s * 1e3, "completion_tokens": self.generated_tokens,
                "completion_ms": self.generated_s * 1e3, "bits": sorted(set(self.bits))}


def eos_ids(tok) -> set:
    """The tokens that end a reply: the tokenizer's EOS and, for ChatML templates, <|im_end|>."""
    cands = [getattr(tok, "eos_token_id", None), tok.convert_tokens_to_ids("<|im_end|>")]
    return {t for t in cands if isinstance(t, int) and t >= 0 and t != getattr(tok, "unk_token_id", None)}


class Generation:
    """One streamed reply. ``prompt_ids``: the whole sequence to condition on; ``cache``/``cached`` (from a
    Conversation): a KV cache already holding ``cached`` (a prefix of prompt_ids)."""

    def __init__(self, sess, prompt_ids, params: SamplingParams | None = None, bits: int = 8,
                 draft_bits: int | None = None, draft_len: int = 4, cache=None, cached: int = 0, on_done=None):
        self.sess, self.params, self.bits = sess, params or SamplingParams(), bits
        self.on_done = on_done
        self.draft_bits, self.draft_len = draft_bits, draft_len
        sess.check_bits(bits)
        if draft_bits is not None:
            sess.check_bits(draft_bits)
            if not self.params.greedy:
                raise ValueError("speculative decoding (draft_bits) keeps greedy output: use temperature 0")
        self.ids = [int(i) for i in prompt_ids]
        if not self.ids:
            raise ValueError("the prompt is empty: give at least one token")
        self.max_len = sess.spec("decode")["max_len"]
        if len(self.ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(self.ids)} tokens; the context holds {self.max_len}")
        self.cache, self.cached = cache, cached if cache is not None else 0
        self.tok = sess.tokenizer
        self.eos = eos_ids(self.tok)
        self.sampler = Sampler(self.params)
        self.new: list[int] = []
        self.stats = Stats()
        self.finish_reason: str | None = None
        self._stopped = False
        self._t_gen = time.perf_counter()
        self.speculative = None       # the speculative run's counts (drafted, accepted, rounds, ...)
        self.text = ""

    def stop(self) -> None:
        self._stopped = True

    def _tokens(self):
        """Token ids as they are chosen (greedy or sampled; speculative: in the verifier's rounds)."""
        s, p = self.sess, self.params
        t0 = time.perf_counter()
        if self.draft_bits is not None:   # drafts and verification in rounds (its own prefill, greedy): the
            budget = min(p.max_new_tokens, self.max_len - len(self.ids))   # tokens come when all are done
            st: dict = {}
            out = s.generate_speculative(self.ids, budget, self.bits, self.draft_bits, self.draft_len,
                                         eos=self.tok.eos_token_id, stats=st)
            self.speculative = st
            self.stats.prompt_tokens, self.stats.bits = len(self.ids), [self.bits, self.draft_bits]
            self.stats.generated_s = time.perf_counter() - t0     # prefill included: one timed span
            self._t_gen = t0
            yield from out
            return
        feed = self.ids[self.cached:]
        logits, self.cache = s.forward_tokens(np.array(feed), self.bits, pos=self.cached, cache=self.cache,
                                              fn=s.prompt_fn, logits="last")
        self.stats.prompt_tokens, self.stats.cached_tokens = len(feed), self.cached
        self.stats.prompt_s = time.perf_counter() - t0
        self._t_gen = time.perf_counter()
        pos = len(self.ids)
        nxt = self.sampler(logits[-1], self.ids)
        while True:
            yield nxt
            if self._stopped or nxt in self.eos or len(self.new) >= p.max_new_tokens or pos >= self.max_len:
                return
            lg, self.cache = s.decode_step(nxt, pos, self.cache, self.bits)
            self.stats.bits.append(self.bits)
            pos += 1
            nxt = self.sampler(lg, self.ids + self.new)

    def __iter__(self):
        p = self.params
        sent = 0
        if p.max_new_tokens == 0:
            self.finish_reason = "length"
            return
        for tok in self._tokens():
            if tok in self.eos:
                self.finish_reason = "stop"
                break
            self.new.append(tok)
            self.stats.generated_tokens = len(self.new)
            text = self.tok.decode(self.new, skip_special_tokens=True)
            stop_at = find_stop(text, p.stop)
            if stop_at >= 0:
                self.text = text[:stop_at]
                self.finish_reason = "stop"
                break
            self.text = text
            safe = len(text) - holdback(text, p.stop)
            if text.endswith("\ufffd"):       # half of a multi-byte character: wait for the rest
                safe = min(safe, len(text) - 1)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            if self._stopped or len(self.new) >= p.max_new_tokens:
                self.finish_reason = "length" if not self._stopped else "stop"
                break
        if self.finish_reason is None:          # the tokens ran out: the context is full
            self.finish_reason = "length"
        if len(self.text) > sent:
            yield self.text[sent:]
        if self.draft_bits is None:
            self.stats.generated_s = time.perf_counter() - self._t_gen
        self.stats.bits = self.stats.bits or [self.bits]
        if self.on_done is not None:
            self.on_done(self)

    def run(self) -> str:
        for _ in self:
            pass
        return self.text


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """The tokenizer's own chat template applied to ``messages`` (role/content dicts), ready to generate."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template: use a plain prompt")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise ValueError("each message needs a role (system, user or assistant) and a text content")
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


class Conversation:
    """Multi-turn chat on one KV cache: ``reply(text)`` adds the user's turn and returns its streamed reply.
    The cache keeps every row up to the conversation's last fed token; a turn feeds the template's ids past
    the longest prefix the cache already holds."""

    def __init__(self, sess, system: str | None = None, params: SamplingParams | None = None, bits: int = 8):
        self.sess, self.params, self.bits = sess, params or SamplingParams(), bits
        self.messages = [{"role": "system", "content": system}] if system else []
        self.cache, self.cached_ids = None, []

    def reply(self, text: str) -> Generation:
        self.messages.append({"role": "user", "content": text})
        ids = chat_ids(self.sess.tokenizer, self.messages)
        common = 0
        for a, b in zip(ids, self.cached_ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)   # feed at least one token: its logits start the reply
        return Generation(self.sess, ids, self.params, self.bits, cache=self.cache if common else None,
                          cached=common, on_done=self._done)

    def _done(self, g: Generation) -> None:
        # rows up to the last token fed are right (the last chosen token was never fed)
        self.cache, self.cached_ids = g.cache, g.ids + g.new[:-1]
        self.messages.append({"role": "assistant", "content": g.text})

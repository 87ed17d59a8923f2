"""Bounded work per request: character limits before tokenizing, the history fit in O(n), the answer cap,
and KV reuse keyed by session (measured by prefill token counts)."""
from __future__ import annotations

import pytest

from mixoff_app.config import SamplingParams
from mixoff_app.limits import InputLimits, InputTooLong

from helpers import load

CONTEXT = 256


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return load(tiny_dir, k=2, max_context=CONTEXT)


def run(engine, messages, session=None, **kw):
    evs = list(engine.stream_chat(messages, SamplingParams(**({"greedy": True, "max_new_tokens": 8} | kw)),
                                  session=session))
    return "".join(e.text for e in evs if e.kind == "token"), evs


def conversation(n_turns: int, text: str = "Tell me about the builtin functions and their arguments.") -> list[dict]:
    conv = []
    for i in range(n_turns):
        conv += [{"role": "user", "content": f"{i}: {text}"}, {"role": "assistant", "content": f"Answer {i}."}]
    return conv + [{"role": "user", "content": "last one"}]


class CountingTokenizer:
    """The engine's tokenizer, counting what it is asked to do."""

    def __init__(self, tok) -> None:
        self.tok, self.renders, self.chars = tok, 0, 0

    def apply_chat_template(self, messages, **kw):
        self.renders += 1
        self.chars += sum(len(m["content"]) for m in messages)
        return self.tok.apply_chat_template(messages, **kw)

    def __call__(self, texts, **kw):
        self.chars += sum(map(len, texts))
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture
def counting(engine):
    real = engine.tokenizer
    engine.tokenizer = CountingTokenizer(real)
    try:
        yield engine.tokenizer
    finally:
        engine.tokenizer = real


def test_limits_follow_the_context_or_the_flag():
    assert InputLimits.for_context(4096) == InputLimits(message=32768, system=32768, history=65536)
    assert InputLimits.for_context(4096, 1000) == InputLimits(message=1000, system=1000, history=2000)
    with pytest.raises(ValueError, match="whole number"):
        InputLimits(message=0, system=1, history=1)


def test_huge_message_and_system_prompt_are_refused_before_tokenizing(engine, counting):
    huge = "x" * (10 * 2**20)
    with pytest.raises(InputTooLong, match=r"^the message is too long: 10,485,760 characters"):
        engine.stream_chat([{"role": "user", "content": huge}], SamplingParams())
    with pytest.raises(InputTooLong, match=r"^the system prompt is too long: 10,485,760 characters"):
        engine.stream_chat([{"role": "system", "content": huge}, {"role": "user", "content": "hi"}],
                           SamplingParams())
    assert counting.renders == 0 and counting.chars == 0          # nothing was tokenized


def test_system_prompt_over_the_context_in_tokens_is_named(engine):
    long_sys = " ".join(f"rule{i}" for i in range(200))          # under the character limit, over the context
    assert len(long_sys) <= engine.limits.system
    with pytest.raises(InputTooLong, match="^the system prompt is too long: about"):
        engine.stream_chat([{"role": "system", "content": long_sys}, {"role": "user", "content": "hi"}],
                           SamplingParams(max_new_tokens=4))


def test_ten_thousand_turns_are_fitted_with_few_renders(engine, counting):
    conv = conversation(10_000)
    _, evs = run(engine, conv)
    assert evs[0].kind == "notice" and "left out" in evs[0].text and evs[-1].kind == "done"
    # Characters bound the work first: only the newest turns within the history budget are ever tokenized,
    # and the template is rendered a handful of times, not once per dropped turn.
    assert counting.renders <= 6, counting.renders
    assert counting.chars <= 6 * (engine.limits.history + 100)


def test_the_fit_keeps_the_longest_window_that_fits(engine):
    """The same window as dropping one exchange at a time and re-rendering (the quadratic reference)."""
    conv = conversation(30)
    params = SamplingParams(max_new_tokens=16)
    ids, notices = engine._fit(conv, params)
    turns = conv
    while len(engine.prompt_ids(turns)) + 16 > CONTEXT and len(turns) > 1:
        turns = turns[2:]
    assert ids == engine.prompt_ids(turns)
    assert notices and f"the {(len(conv) - len(turns)) // 2} oldest" in notices[0]


def test_answer_cap_is_bounded_by_the_context(engine):
    conv = conversation(2)
    # A cap far beyond the context keeps the recent history (at most half the context is held back for the
    # answer) and ends when the context is full.
    ids, notices = engine._fit(conv, SamplingParams(max_new_tokens=10**9))
    assert not notices and ids == engine.prompt_ids(conv)
    _, evs = run(engine, conv, max_new_tokens=10**9)
    assert evs[-1].finish_reason in ("context", "eos")


def test_malformed_conversations_get_one_sentence(engine):
    bad = [
        ([{"role": "wizard", "content": "a"}, {"role": "user", "content": "b"}], "role"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
         "system prompt"),
        (["just a string"], "'messages\\[0\\]' must be an object with 'role' and 'content'"),
        ("not a list", "list of"),
    ]
    for messages, msg in bad:
        with pytest.raises(ValueError, match=msg):
            engine.stream_chat(messages, SamplingParams(max_new_tokens=2))


def test_kv_reuse_is_per_session(tiny_dir):
    """Turn 2 of a session prefills only its new tokens; another session's turn in between costs a
    re-prefill and changes nothing in the answer."""
    eng = load(tiny_dir, k=2, max_context=CONTEXT)
    fresh = load(tiny_dir, k=2, max_context=CONTEXT)
    conv = [{"role": "user", "content": "What does len do?"}]
    a, _ = run(eng, conv, session="alice", max_new_tokens=10)
    conv2 = conv + [{"role": "assistant", "content": a}, {"role": "user", "content": "And zip?"}]
    full = len(eng.prompt_ids(conv2))
    first = len(eng.prompt_ids(conv))
    b, _ = run(eng, conv2, session="alice", max_new_tokens=10)
    assert eng.stats().prefill_tokens <= full - first          # only the new turn (and maybe the answer)
    # Bob asks the very same first question: he gets no reuse of Alice's tokens.
    run(eng, conv, session="bob", max_new_tokens=10)
    assert eng.stats().prefill_tokens == first
    # Alice again after Bob: a full re-prefill, the same answer as a fresh engine gives.
    conv3 = conv2 + [{"role": "assistant", "content": b}, {"role": "user", "content": "And map?"}]
    c, _ = run(eng, conv3, session="alice", max_new_tokens=10)
    assert eng.stats().prefill_tokens == len(eng.prompt_ids(conv3))
    assert c == run(fresh, conv3, max_new_tokens=10)[0]


def test_closing_the_stream_after_done_keeps_the_kv(engine):
    """The app stops reading once it has the answer (closing the stream): the next turn still reuses it."""
    conv = [{"role": "user", "content": "What is a tuple?"}]
    it = engine.stream_chat(conv, SamplingParams(greedy=True, max_new_tokens=8), session="s")
    text = ""
    for ev in it:
        text += ev.text
        if ev.kind == "done":
            break
    it.close()
    conv += [{"role": "assistant", "content": text}, {"role": "user", "content": "More?"}]
    run(engine, conv, session="s")
    assert engine.stats().prefill_tokens < len(engine.prompt_ids(conv)) - len(engine.prompt_ids(conv[:1])) + 1


def test_the_fit_on_random_conversations_fits_and_keeps_nearly_all_it_can(engine):
    """Seeded conversations with turns of random lengths: the prompt always fits with the answer's room, and
    the window is the reference's longest one, or at most one exchange shorter."""
    import random
    rng = random.Random(0)
    words = "list dict set tuple len sorted zip map filter open print range enumerate iterator".split()
    for _ in range(12):
        conv = []
        for i in range(rng.randrange(5, 40)):
            conv += [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randrange(1, 30)))},
                     {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randrange(0, 40)))}]
        conv.append({"role": "user", "content": "and then?"})
        reserve = rng.choice((8, 32, 100))
        ids, _ = engine._fit(conv, SamplingParams(max_new_tokens=reserve))
        assert len(ids) + reserve <= CONTEXT
        turns = conv
        while len(engine.prompt_ids(turns)) + reserve > CONTEXT and len(turns) > 1:
            turns = turns[2:]
        assert ids in (engine.prompt_ids(turns), engine.prompt_ids(turns[2:])), "at most one exchange fewer"

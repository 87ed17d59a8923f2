"""Generation: sampling, stop strings, multi-turn KV reuse, context overflow, cancel, bad input, two users."""
from __future__ import annotations

import threading

import pytest
import torch

from mixoff_app.config import ConfigError, SamplingParams
from mixoff_app.generate import TextStream, sample

from helpers import load


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return load(tiny_dir, k=2, max_context=256)


def run(engine, messages, **kw):
    evs = list(engine.stream_chat(messages, SamplingParams(**({"greedy": True} | kw))))
    text = "".join(e.text for e in evs if e.kind == "token")
    ids = [e.token_id for e in evs if e.kind == "token" and e.token_id is not None]
    return text, ids, evs


def test_sampling_controls():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    best = int(logits.argmax())
    g = torch.Generator().manual_seed(1)
    assert int(sample(logits, SamplingParams(greedy=True), None)) == best
    assert int(sample(logits, SamplingParams(temperature=0), None)) == best
    assert all(int(sample(logits, SamplingParams(temperature=1.0, top_k=1), g)) == best for _ in range(20))
    assert all(int(sample(logits, SamplingParams(temperature=1.0, top_p=1e-6), g)) == best for _ in range(20))
    top3 = set(torch.topk(logits, 3).indices[0].tolist())
    assert {int(sample(logits, SamplingParams(temperature=2.0, top_k=3), g)) for _ in range(200)} <= top3
    a = [int(sample(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(7))) for _ in range(3)]
    assert len(set(a)) == 1          # same seed, same draw


@pytest.mark.parametrize("kw,msg", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                    ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
                                    ({"top_k": -2}, "top_k"), ({"temperature": float("nan")}, "temperature")])
def test_bad_sampling_values_are_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SamplingParams(**kw)


def test_stop_strings_hold_back_and_cut(tokenizer):
    ids = tokenizer("alpha beta STOP gamma")["input_ids"]
    s = TextStream(tokenizer, ("STOP",))
    out, stopped = "", False
    for t in ids:
        d, stopped = s.push(t)
        out += d
        if stopped:
            break
    assert stopped and out == "alpha beta " and "ST" not in out
    s = TextStream(tokenizer, ())
    assert "".join(s.push(t)[0] for t in ids) + s.flush() == "alpha beta STOP gamma"


def test_streamed_text_equals_a_full_decode():
    """Windowed incremental decoding gives exactly the full decode, multi-byte characters included."""
    import random

    from transformers import AutoTokenizer

    from mixoff_app.hub import tiny_path
    tok = AutoTokenizer.from_pretrained(str(tiny_path()))
    rng = random.Random(0)
    samples = [tok("héllo wörld — ✓ 日本語\n    return x")["input_ids"]]
    samples += [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 80))] for _ in range(100)]
    for ids in samples:
        s = TextStream(tok)
        out = "".join(s.push(i)[0] for i in ids) + s.flush()
        full = tok.decode(ids, skip_special_tokens=True)
        assert out == full or (full.endswith("\ufffd") and out == full.rstrip("\ufffd")), (out, full)


def test_stop_string_ends_generation(engine):
    text, _, evs = run(engine, [{"role": "user", "content": "hello"}], max_new_tokens=20)
    assert len(text) > 3
    stop = text[2:4]
    text2, _, evs2 = run(engine, [{"role": "user", "content": "hello"}], max_new_tokens=20, stop=(stop,))
    assert evs2[-1].finish_reason == "stop" and text2 == text[:text.find(stop)]


def test_multi_turn_reuses_the_kv_cache_and_matches_a_fresh_run(tiny_dir, engine):
    conv = [{"role": "user", "content": "What does len do?"}]
    first = len(engine.prompt_ids(conv))
    a, _, _ = run(engine, conv, max_new_tokens=12)
    conv += [{"role": "assistant", "content": a}, {"role": "user", "content": "And zip?"}]
    b, b_ids, _ = run(engine, conv, max_new_tokens=12)
    full = len(engine.prompt_ids(conv))
    # At least the whole first prompt came from the KV cache (the answer's tokens too, where the template
    # re-tokenizes them identically).
    assert engine.stats().prefill_tokens <= full - first
    fresh = load(tiny_dir, k=2, max_context=256)
    c, c_ids, _ = run(fresh, conv, max_new_tokens=12)
    assert fresh.stats().prefill_tokens == full
    assert b_ids == c_ids and b == c


def test_retry_is_bit_for_bit_the_first_answer(engine, monkeypatch):
    """Asking the same prompt again (the app's Retry, an API client's regenerate) reuses the KV cache only up to
    the start of the prefill chunk the prompt ended in, so its logits are bit for bit the first answer's:
    re-running the last prompt token alone would differ in the last bits (checked here) and could flip a
    near-tied greedy choice."""
    m = engine.model
    calls = []
    forward = type(m).forward

    def spy(self, ids, pos, last_only=True):
        calls.append(forward(self, ids, pos, last_only))
        return calls[-1]

    conv = [{"role": "user", "content": "What does len do?"}]
    a, _, _ = run(engine, conv, max_new_tokens=8)
    conv += [{"role": "assistant", "content": a}, {"role": "user", "content": "And zip?"}]
    prompt = engine.prompt_ids(conv)
    monkeypatch.setattr(type(m), "forward", spy)
    answers, prefill_logits = [], []
    for _ in range(2):
        n = len(calls)
        answers.append(run(engine, conv, max_new_tokens=16)[1])
        prefill_logits.append(calls[n])
        # The earlier turn's tokens came from the cache both times: only the new message was prefilled.
        assert engine.stats().prefill_tokens < len(prompt)
    assert torch.equal(prefill_logits[0], prefill_logits[1])
    assert answers[0] == answers[1]
    # What the chunk boundary avoids: the last prompt token run alone gives other bits.
    monkeypatch.undo()
    engine.forget_kv()
    ids = torch.tensor(prompt)
    whole = m.forward(ids, 0)
    m.forward(ids[:-1], 0)
    assert not torch.equal(whole, m.forward(ids[-1:], len(prompt) - 1))
    engine.forget_kv()


def test_full_context_drops_old_turns_with_a_notice(tiny_dir):
    small = load(tiny_dir, k=2, max_context=96)
    conv = []
    for i in range(6):
        conv += [{"role": "user", "content": f"Question number {i} about the builtin functions?"},
                 {"role": "assistant", "content": "An answer that takes some room in the context window."}]
    conv.append({"role": "user", "content": "last one"})
    text, ids, evs = run(small, conv, max_new_tokens=16)
    assert evs[0].kind == "notice" and "left out" in evs[0].text
    assert evs[-1].kind == "done" and ids


def test_an_answer_that_reaches_the_end_of_the_context_stops_there(tiny_dir):
    """The random tiny model's greedy answer to "hi" never samples EOS, so with 200 new tokens allowed in a
    96-token context the generation must stop at the context's end: one token per free position, plus the
    last one sampled from the final position's logits (it is shown but never fed)."""
    small = load(tiny_dir, k=2, max_context=96)
    conv = [{"role": "user", "content": "hi"}]
    prompt = small.prompt_ids(conv)
    _, ids, evs = run(small, conv, max_new_tokens=200)
    assert evs[-1].kind == "done" and evs[-1].finish_reason == "context"
    assert not set(ids) & small.eos_ids
    assert len(ids) == small.model.max_seq - len(prompt) + 1
    assert small.kv_tokens == tuple(prompt + ids[:-1]) and len(small.kv_tokens) == small.model.max_seq
    # The full cache is not a dead end: the next turn drops what does not fit and answers.
    _, ids2, evs2 = run(small, conv + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}],
                        max_new_tokens=4)
    assert evs2[-1].finish_reason == "length" and len(ids2) == 4


def test_huge_and_empty_prompts_are_refused_clearly(engine):
    with pytest.raises(ValueError, match="too long"):
        engine.stream_chat([{"role": "user", "content": "word " * 2000}], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        engine.stream_chat([{"role": "user", "content": "   "}], SamplingParams())
    with pytest.raises(ValueError, match="non-empty list"):
        engine.stream_chat([], SamplingParams())
    with pytest.raises(ValueError, match="end with a user message"):
        engine.stream_chat([{"role": "assistant", "content": "hi"}], SamplingParams())
    # Gradio 6 sends content as a list of blocks: the same prompt as the plain string, so the same answer.
    plain = run(engine, [{"role": "user", "content": "hello there"}], max_new_tokens=6)
    blocks = run(engine, [{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                       {"type": "text", "text": "there"}]}], max_new_tokens=6)
    assert blocks[:2] == plain[:2] and len(plain[1]) == 6
    other = run(engine, [{"role": "user", "content": "goodbye"}], max_new_tokens=6)
    assert other[1] != plain[1]           # the comparison can tell prompts apart


def test_cancel_keeps_what_was_written(engine):
    cancel = threading.Event()
    got = []
    for ev in engine.stream_chat([{"role": "user", "content": "tell me more"}],
                                 SamplingParams(max_new_tokens=100, greedy=True), cancel=cancel):
        if ev.kind == "token":
            got.append(ev)
            if len(got) == 5:
                cancel.set()
        last = ev
    assert last.finish_reason == "cancelled" and len(got) == 5
    # The engine is usable right after, and the KV cache still serves the next turn correctly.
    text, ids, evs = run(engine, [{"role": "user", "content": "tell me more"}], max_new_tokens=5)
    assert [e.token_id for e in got] == ids


def test_two_users_at_once_get_their_own_answers(tiny_dir, engine):
    prompts = ["What is a list?", "Explain the with statement."]
    expected = [run(load(tiny_dir, k=2, max_context=256), [{"role": "user", "content": p}], max_new_tokens=10)[1]
                for p in prompts]
    results = [None, None]

    def worker(i):
        results[i] = run(engine, [{"role": "user", "content": prompts[i]}], max_new_tokens=10)[1]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected


def test_a_generated_answer_renders_back_to_its_own_tokens():
    """On the shipped demo model the chat template re-tokenizes an answer exactly as generated, so the
    next turn prefills only its new tokens."""
    from mixoff_app.config import CacheConfig, EngineConfig
    from mixoff_app.engine import Engine
    eng = Engine.load(EngineConfig(model="tiny", device="cpu", cache=CacheConfig(sizes=(3,))))
    conv = [{"role": "user", "content": "What does len do?"}]
    answer, _, evs = run(eng, conv, max_new_tokens=60)
    assert evs[-1].finish_reason == "eos"
    cached = list(eng.kv_tokens)
    conv += [{"role": "assistant", "content": answer}, {"role": "user", "content": "What does sorted do?"}]
    ids = eng.prompt_ids(conv)
    assert ids[:len(cached)] == cached
    run(eng, conv, max_new_tokens=4)
    assert eng.stats().prefill_tokens == len(ids) - len(cached)


def test_time_to_first_token_ends_when_the_first_token_reaches_the_caller(engine):
    """ttft_s is stamped as the first token event is handed over, before the model runs that token: a caller
    that holds the first event for a while sees the same ttft_s then and after the answer."""
    import time
    stream = engine.stream_chat([{"role": "user", "content": "What is a tuple?"}],
                                SamplingParams(max_new_tokens=4, greedy=True))
    first = next(ev for ev in stream if ev.kind == "token")
    at_first = engine.stats()
    assert at_first.answer_tokens == 0                   # no decode step has run since the token was sampled
    assert 0 < at_first.ttft_s <= first.elapsed_s
    assert at_first.prefill_s <= at_first.ttft_s
    time.sleep(0.2)
    rest = list(stream)
    assert rest[-1].kind == "done"
    after = engine.stats()
    assert after.answer_tokens >= 1 and after.ttft_s == at_first.ttft_s

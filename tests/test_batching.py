"""Continuous batching: answers that run together are, token for token, the answers they give alone; they join
and leave the batch at any step; one client cannot hold every slot; the waiting line is bounded; each answer's
figures are its own."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, SamplingParams
from mixoff_app.engine import Engine
from mixoff_app.limits import Busy
from mixoff_app.tiny import make_family_checkpoint

from helpers import cached_tokens

QUESTIONS = ["What is a list?", "Explain the with statement.", "What does zip do?", "Tell me about len.",
             "What is a tuple?"]
GREEDY = SamplingParams(max_new_tokens=20, greedy=True)


def engine_for(path, quant=NO_QUANT, k=3, **kw) -> Engine:
    return Engine.load(EngineConfig(model=str(path), device="cpu", quant=quant, cache=CacheConfig(sizes=(k,)),
                                    max_context=256, **kw))


def run(eng: Engine, q: str, session: str, params=GREEDY, client=None) -> list:
    return list(eng.stream_chat([{"role": "user", "content": q}], params, session=session, client=client))


def ids_of(events) -> list[int]:
    return [e.token_id for e in events if e.kind == "token" and e.token_id is not None]


def together(eng: Engine, questions, params=GREEDY, prefix="t") -> list:
    out: list = [None] * len(questions)

    def go(i):
        out[i] = run(eng, questions[i], f"{prefix}{i}", params)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pytest.mark.parametrize("quant", ["none", "default"])
def test_answers_in_a_batch_are_the_answers_alone(tiny_dir, quant):
    eng = engine_for(tiny_dir, NO_QUANT if quant == "none" else QuantConfig(), max_batch=4)
    alone = [ids_of(run(eng, q, f"a{i}")) for i, q in enumerate(QUESTIONS[:4])]
    eng.forget_kv()
    rows_seen = []
    real = eng.model.decode

    def watched(ids, pos, seqs):
        rows_seen.append(len(seqs))
        return real(ids, pos, seqs)
    eng.model.decode = watched
    batched = together(eng, QUESTIONS[:4])
    assert [ids_of(evs) for evs in batched] == alone
    assert max(rows_seen) >= 3, rows_seen             # they really shared steps
    for evs in batched:                                # each answer's figures are its own
        a = evs[-1].answer
        assert evs[-1].finish_reason == "length" and a.tokens == 20 and len(a.routing) == 20
        L, K = eng.model.cfg.num_moe_layers, eng.model.cfg.top_k
        assert a.decode["hits"] + a.decode["misses"] == L * K * a.tokens
        assert all(len(tok) == L and all(len(set(es)) == K for es in tok) for tok in a.routing)


def test_a_batch_of_latent_attention_rows_is_the_rows_alone(tiny_dir, tmp_path):
    """DeepSeek-V2's latent attention and dense first layer, and a shared expert, through batched steps."""
    folder = make_family_checkpoint(tmp_path / "ds", "deepseek_v2", tiny_dir, seed=2, hidden_size=32,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                    num_hidden_layers=3, num_experts=12, num_experts_per_tok=3,
                                    moe_intermediate_size=24, intermediate_size=56, n_shared_experts=2,
                                    first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                    qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12, norm_topk_prob=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    eng = engine_for(folder, k=4, max_batch=3)
    alone = [ids_of(run(eng, q, f"a{i}")) for i, q in enumerate(QUESTIONS[:3])]
    eng.forget_kv()
    assert [ids_of(evs) for evs in together(eng, QUESTIONS[:3])] == alone


def test_an_answer_joins_a_running_batch_and_one_leaves_it_early(tiny_dir):
    """A newcomer starts while others decode (its prefill is one chunk between their steps); a cancelled answer
    leaves at the next step and frees its slot; the rest end as they would alone."""
    eng = engine_for(tiny_dir, max_batch=3)
    long = SamplingParams(max_new_tokens=60, greedy=True)
    alone = {q: ids_of(run(eng, q, "solo" + q, long)) for q in QUESTIONS[:3]}
    eng.forget_kv()
    cancel = threading.Event()
    got: dict = {}
    first_seen = threading.Event()

    def reader(q, c=None):
        evs = []
        for ev in eng.stream_chat([{"role": "user", "content": q}], long, cancel=c, session=q):
            evs.append(ev)
            if ev.kind == "token":
                first_seen.set()
                if c is not None and len(evs) >= 5:
                    c.set()
        got[q] = evs
    t1 = threading.Thread(target=reader, args=(QUESTIONS[0],))
    t2 = threading.Thread(target=reader, args=(QUESTIONS[1], cancel))
    t1.start()
    t2.start()
    first_seen.wait(60)
    time.sleep(0.05)
    t3 = threading.Thread(target=reader, args=(QUESTIONS[2],))       # joins while the two decode
    t3.start()
    for t in (t1, t2, t3):
        t.join(120)
    assert got[QUESTIONS[1]][-1].finish_reason == "cancelled"
    assert len(ids_of(got[QUESTIONS[1]])) < 60
    for q in (QUESTIONS[0], QUESTIONS[2]):
        assert ids_of(got[q]) == alone[q] and got[q][-1].finish_reason == "length"
    assert eng.scheduler.load() == (0, 0) and not eng.busy
    # The cancelled answer's tokens stay in its slot, whole: its session's next turn may reuse them.
    assert len(cached_tokens(eng, QUESTIONS[1])) > 0


def test_one_client_cannot_hold_every_slot(tiny_dir):
    """max_batch 2, per client 1: while key-a's first answer runs, its second waits (and says so) and key-b's
    runs beside the first; once the first ends, the second starts."""
    eng = engine_for(tiny_dir, max_batch=2, per_client=1)
    long, short = SamplingParams(max_new_tokens=200, greedy=True), SamplingParams(max_new_tokens=6, greedy=True)
    stop_first = threading.Event()
    got: dict = {}
    streaming = {k: threading.Event() for k in ("k1", "k2", "k3")}

    def go(q, session, client, params, cancel=None):
        evs = []
        for ev in eng.stream_chat([{"role": "user", "content": q}], params, cancel=cancel, session=session,
                                  client=client):
            evs.append(ev)
            if ev.kind == "token":
                streaming[session].set()
        got[session] = evs
    t1 = threading.Thread(target=go, args=(QUESTIONS[0], "k1", "key-a", long, stop_first))
    t1.start()
    assert streaming["k1"].wait(60)
    t2 = threading.Thread(target=go, args=(QUESTIONS[1], "k2", "key-a", short))
    t2.start()
    time.sleep(0.05)
    t3 = threading.Thread(target=go, args=(QUESTIONS[2], "k3", "key-b", short))
    t3.start()
    t3.join(60)
    assert got["k3"][-1].finish_reason == "length" and not streaming["k2"].is_set()   # b ran; a's second waited
    stop_first.set()
    t1.join(60)
    t2.join(60)
    waited = [e for e in got["k2"] if e.kind == "waiting"]
    assert waited and "answers are running" in waited[0].text
    assert got["k1"][-1].finish_reason == "cancelled" and got["k2"][-1].finish_reason == "length"


def test_the_waiting_line_is_bounded_and_refuses_at_once(tiny_dir):
    eng = engine_for(tiny_dir, max_batch=1, max_waiting=1)
    params = SamplingParams(max_new_tokens=40, greedy=True)
    first = eng.stream_chat([{"role": "user", "content": QUESTIONS[0]}], params, session="a")
    second = eng.stream_chat([{"role": "user", "content": QUESTIONS[1]}], params, session="b")
    t0 = time.perf_counter()
    with pytest.raises(Busy, match="the server is busy: .* try again in a moment"):
        eng.stream_chat([{"role": "user", "content": QUESTIONS[2]}], params, session="c")
    assert time.perf_counter() - t0 < 1.0                 # at once, not after the others
    assert list(first)[-1].finish_reason == "length" and list(second)[-1].finish_reason == "length"
    assert eng.scheduler.load() == (0, 0)
    assert list(eng.stream_chat([{"role": "user", "content": QUESTIONS[2]}], params, session="c"))[-1].kind == "done"


def test_many_clients_leave_nothing_behind(tiny_dir):
    """32 clients at once against 2 slots and a line of 8: every one is answered or refused, and afterwards the
    engine holds exactly what it held before (its slots), however many came."""
    eng = engine_for(tiny_dir, max_batch=2, max_waiting=8)
    params = SamplingParams(max_new_tokens=4, greedy=True)
    outcomes = []

    def client(i):
        try:
            evs = run(eng, QUESTIONS[i % 5], f"c{i}", params)
            outcomes.append(evs[-1].finish_reason)
        except Busy:
            outcomes.append("busy")
    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outcomes) == 32 and outcomes.count("length") >= 10 and "busy" in outcomes
    assert set(outcomes) <= {"length", "busy"}
    assert eng.scheduler.load() == (0, 0) and len(eng.scheduler.slots) == 2
    assert not eng.scheduler.waiting and not eng.scheduler.active


def test_the_panel_sees_the_batch(tiny_dir):
    eng = engine_for(tiny_dir, max_batch=3)
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            s = eng.stats()
            seen.append((s.batch_rows, s.running_answers, s.max_batch))
            time.sleep(0.002)
    w = threading.Thread(target=watch)
    w.start()
    together(eng, QUESTIONS[:3], SamplingParams(max_new_tokens=30, greedy=True))
    stop.set()
    w.join()
    assert max(r for r, _, _ in seen) >= 2 and max(n for _, n, _ in seen) == 3 and seen[-1][2] == 3
    assert eng.stats().running_answers == 0 and not eng.stats().generating


def test_sampled_answers_keep_their_own_seeds_in_a_batch(tiny_dir):
    eng = engine_for(tiny_dir, max_batch=3)
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, seed=s) for s in (1, 2, 3)]
    alone = [ids_of(run(eng, QUESTIONS[0], f"s{i}", p)) for i, p in enumerate(params)]
    eng.forget_kv()
    out: list = [None] * 3

    def go(i):
        out[i] = ids_of(run(eng, QUESTIONS[0], f"t{i}", params[i]))
    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == alone and len({tuple(x) for x in alone}) > 1


def test_max_batch_is_refused_when_wrong():
    from mixoff_app.config import ConfigError
    with pytest.raises(ConfigError, match="max_batch must be a whole number >= 1"):
        EngineConfig(max_batch=0)
    with pytest.raises(ConfigError, match="max_waiting must be a whole number >= 0"):
        EngineConfig(max_waiting=-1)


def test_rows_decode_bit_for_bit_alone(tiny_dir):
    """The model level: one step over three sequences' rows gives each row the logits of its own one-row step."""
    eng = engine_for(tiny_dir, quant=QuantConfig(), max_batch=3)
    m = eng.model
    prompts = [[1, 5, 9, 200, 31], [1, 7, 7, 7, 2, 100, 50, 60], [1, 300, 301]]
    alone = []
    for s, p in enumerate(prompts):
        m.forward(torch.tensor(p), 0, seq=s)
        alone.append(m.forward(torch.tensor([11 + s]), len(p), seq=s))
    for s, p in enumerate(prompts):
        m.forward(torch.tensor(p), 0, seq=s)
    rows = m.decode(torch.tensor([11, 12, 13]), [len(p) for p in prompts], [0, 1, 2])
    assert all(torch.equal(rows[s:s + 1], alone[s]) for s in range(3))

"""Trace file format, replay against brute-force references, Belady, the synthetic generator, CLI."""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import random
from pathlib import Path

import pytest

from mixoff_app.cli.trace import add_parser as add_trace_parser
from mixoff_app.cli.trace import record_main
from mixoff_app.trace import (
    TABLE5_ANCHORS,
    Trace,
    TraceError,
    belady,
    random_baseline,
    read_trace,
    routing_stats,
    simulate,
    synthetic_targets,
    synthetic_trace,
    write_trace,
)
from mixoff_app.trace.synthetic import _chain_share

REPO = Path(__file__).resolve().parents[1]


def _random_routing(rng: random.Random, tokens: int, layers: int, experts: int, top_k: int):
    return [[tuple(rng.sample(range(experts), top_k)) for _ in range(layers)] for _ in range(tokens)]


# ---------------------------------------------------------------------------- brute-force references

def _reference_replay(column, k, policy, decay=0.0):
    """Naive replay: scores recomputed from the full access history at every eviction.

    Same call order as ``ExpertCache.fetch``: hits first, then misses (victims among residents the
    token does not need), then the loaded experts are used.
    """
    history: dict[int, list[int]] = {}     # expert -> ticks of accesses
    last: dict[int, int] = {}              # expert -> global access counter of its last access
    counter = 0
    slots: list[int] = []
    hits = misses = evictions = 0

    def use(e, tick):
        nonlocal counter
        history.setdefault(e, []).append(tick)
        counter += 1
        last[e] = counter

    def pick(cands, tick):
        now = max(max(h) for h in history.values())
        if policy == "lru":
            key = lambda r: last[r]                                                     # noqa: E731
        elif policy == "lfu":
            key = lambda r: (len(history[r]), last[r])                                  # noqa: E731
        else:
            key = lambda r: (sum(2.0 ** (-decay * (now - u)) for u in history[r]), last[r])  # noqa: E731
        return min(cands, key=key)

    for tick, needed in enumerate(column):
        present = [e for e in needed if e in slots]
        absent = [e for e in needed if e not in slots]
        hits, misses = hits + len(present), misses + len(absent)
        for e in present:
            use(e, tick)
        loaded = []
        for e in absent:
            if len(slots) < k:
                slots.append(e)
            else:
                cands = [r for r in slots if r not in needed]
                if not cands:
                    break
                slots[slots.index(pick(cands, tick))] = e
                evictions += 1
            loaded.append(e)
        for e in loaded:
            use(e, tick)
        for e in absent[len(loaded):]:
            served = set(present) | set(absent[:absent.index(e)])
            slots[slots.index(pick([r for r in slots if r in served], tick))] = e
            evictions += 1
            use(e, tick)
    return hits, misses, evictions


def _optimal_misses(column, k):
    """Exhaustive search over every eviction choice the cache's rules allow (memoised on token and
    resident set); misses per token are fixed by the resident set, the choices shape the future."""

    def ends(resident, needed, absent, i, served):
        # every resident set the token can end with, loading absent[i:] in order
        if i == len(absent):
            yield resident
            return
        e = absent[i]
        if len(resident) < k:
            yield from ends(resident | {e}, needed, absent, i + 1, served | {e})
            return
        cands = [r for r in resident if r not in needed] or [r for r in resident if r in served]
        for v in cands:
            yield from ends((resident - {v}) | {e}, needed, absent, i + 1, served | {e})

    @functools.lru_cache(maxsize=None)
    def best(t, resident):
        if t == len(column):
            return 0
        needed = column[t]
        absent = [e for e in needed if e not in resident]
        served = frozenset(e for e in needed if e in resident)
        return len(absent) + min(best(t + 1, end) for end in set(ends(resident, needed, absent, 0, served)))

    return best(0, frozenset())


# ---------------------------------------------------------------------------- replay

@pytest.mark.parametrize("seed", range(4))
def test_simulate_matches_brute_force_reference(seed):
    rng = random.Random(seed)
    experts, top_k = rng.choice([(6, 2), (5, 1), (8, 2), (7, 3)])
    routing = _random_routing(rng, 50, 2, experts, top_k)
    # make some experts hot so frequency and recency disagree
    for t in range(0, 50, 3):
        routing[t][0] = tuple([0] + [e for e in routing[t][0] if e != 0])[:top_k]
    for k in range(1, experts + 1):
        for policy, decay in (("lru", 0.0), ("lfu", 0.0), ("lrfu", None), ("lrfu", 0.3), ("lrfu", 1.5)):
            if policy == "lrfu":
                from mixoff_app.policy import LRFU
                d = LRFU.DEFAULT_DECAY if decay is None else decay
                got = simulate(routing, k, lambda n, d=d: LRFU(n, decay=d))
            else:
                d = 0.0
                got = simulate(routing, k, policy)
            for layer in range(2):
                column = [tok[layer] for tok in routing]
                want = _reference_replay(column, k, policy, d)
                assert (got.hits[layer], got.misses[layer], got.evictions[layer]) == want, (policy, d, k, layer)


def _drive_expert_cache(routing, k, policy, num_experts):
    """Run the real ``ExpertCache`` on the CPU over a routing trace (tiny fake store and stats)."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from mixoff_app.expert_cache import ExpertCache
    from mixoff_app.stores.base import SlotCopies

    class Layout:
        nbytes = 4

        def weights(self, buf):
            return buf

    class Store(SlotCopies):          # inclusive placement over 4-byte "experts" that say who they are
        placement, pinned = "inclusive", False
        layout = Layout()
        cfg = SimpleNamespace(num_experts=num_experts)

        def buffer(self, layer, expert):
            return torch.full((4,), expert, dtype=torch.uint8)

        def load_into(self, layer, expert, slot, victim, ready, done):
            self.copy_into(slot, self.buffer(layer, expert), ready, done)
            return 0

    class Counts:
        placement = "inclusive"

        def __init__(self, layers):
            self.hits, self.misses, self.evictions = [0] * layers, [0] * layers, [0] * layers

        def configure(self, *a):
            pass

        def on_hit(self, layer, e):
            self.hits[layer] += 1

        def on_miss(self, layer, e, nbytes):
            self.misses[layer] += 1

        def on_evict(self, layer, e, *a):
            self.evictions[layer] += 1

        def __getattr__(self, name):          # on_slot, on_prefetch*, ...: not counted here
            return lambda *a, **kw: None

    layers = len(routing[0])
    counts = Counts(layers)
    cache = ExpertCache(Store(), (k,) * layers, policy, torch.device("cpu"), counts)
    for tok in routing:
        for layer, needed in enumerate(tok):
            for e, w, slot in cache.fetch(layer, list(needed)):
                assert int(w[0]) == e                 # the slot really holds that expert
                cache.release(layer, slot)
        cache.next_token()
    return counts


@pytest.mark.parametrize("policy", ["lru", "lfu", "lrfu"])
def test_simulate_mirrors_the_real_expert_cache(policy):
    rng = random.Random(42)
    routing = _random_routing(rng, 120, 2, 8, 2)
    for t in range(0, 120, 4):
        routing[t][1] = (3, routing[t][1][0] if routing[t][1][0] != 3 else routing[t][1][1])
    for k in (1, 2, 3, 4, 6):
        counts = _drive_expert_cache(routing, k, policy, 8)
        sim = simulate(Trace({"num_experts": 8}, routing), k, policy)
        assert (sim.hits, sim.misses, sim.evictions) == (counts.hits, counts.misses, counts.evictions), k


def test_replay_result_counts_add_up():
    trace = synthetic_trace(100, num_layers=3, seed=3)
    r = simulate(trace, [2, 4, 8], "lru")
    assert r.cache_sizes == (2, 4, 8)
    assert [h + m for h, m in zip(r.hits, r.misses)] == [200, 200, 200]
    assert r.evictions[2] == 0 and r.misses[2] == r.cold_misses[2]
    assert r.layer_hit_rates[0] < r.layer_hit_rates[1] < r.layer_hit_rates[2]
    d = r.to_dict()
    assert d["hits"] + d["misses"] == 600 and len(d["layer_hit_rates"]) == 3
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        simulate(trace, 9, "lru")
    with pytest.raises(ValueError, match="2 per-layer cache sizes given for 3 layers"):
        simulate(trace, [2, 2], "lru")


@pytest.mark.parametrize("seed", range(6))
def test_belady_equals_exhaustive_optimum(seed):
    rng = random.Random(100 + seed)
    experts, top_k = [(5, 2), (4, 1), (6, 2), (5, 3)][seed % 4]
    routing = _random_routing(rng, 9, 1, experts, top_k)
    column = [tok[0] for tok in routing]
    for k in range(1, experts + 1):
        assert belady(Trace({"num_experts": experts}, routing), k).misses[0] == _optimal_misses(column, k), k


def test_belady_bounds_every_policy():
    rng = random.Random(7)
    traces = [_random_routing(rng, 150, 2, 8, 2), _random_routing(rng, 150, 2, 6, 3),
              synthetic_trace(400, num_layers=4, seed=11)]
    for trace in traces:
        num_experts = 8 if isinstance(trace, Trace) else 1 + max(e for tok in trace for ex in tok for e in ex)
        for k in range(1, num_experts + 1):
            b = belady(trace, k)
            for policy in ("lru", "lfu", "lrfu"):
                r = simulate(trace, k, policy)
                for layer in range(len(r.hits)):
                    assert b.hits[layer] >= r.hits[layer], (policy, k, layer)
            assert b.hit_rate <= b.cold_bound + 1e-12


def test_lrfu_beats_lru_on_calibrated_synthetic_trace():
    trace = synthetic_trace(2000, seed=2)
    lru, lfu, lrfu = (simulate(trace, 4, p).hit_rate for p in ("lru", "lfu", "lrfu"))
    b = belady(trace, 4).hit_rate
    assert lrfu > lru + 0.015, (lru, lrfu)
    assert lrfu >= lfu - 0.005
    assert b > lrfu


# ---------------------------------------------------------------------------- synthetic generator

def test_synthetic_targets_interpolate_table5():
    tg = synthetic_targets(32)
    for layer, (s1, s2) in TABLE5_ANCHORS.items():
        assert tg[layer] == pytest.approx((s1, s2))
    assert tg[7][0] == pytest.approx(0.14 + 7 / 15 * (0.26 - 0.14))
    assert tg[23][1] == pytest.approx(0.645 + 8 / 16 * (0.495 - 0.645))
    assert random_baseline(8, 2) == pytest.approx((0.125, 1 - 15 / 28))
    # the exact chain reproduces random routing when nothing is sticky
    assert _chain_share([1 / 8] * 8, 0.0, 1.0, 2) == pytest.approx(1 - 15 / 28)


def test_synthetic_statistics_match_mixtral_table5():
    trace = synthetic_trace(8000, seed=0)
    stats = routing_stats(trace)
    for layer, (first, share) in TABLE5_ANCHORS.items():
        assert abs(stats[layer]["first_same"] - first) < 0.02, (layer, stats[layer])
        assert abs(stats[layer]["share_any"] - share) < 0.02, (layer, stats[layer])
    # and the statistics can fail: uniform random routing is far from layer 15's targets
    rand = routing_stats(_random_routing(random.Random(0), 8000, 1, 8, 2))[0]
    assert abs(rand["first_same"] - 0.125) < 0.015 and abs(rand["share_any"] - 0.464) < 0.02
    assert TABLE5_ANCHORS[15][1] - rand["share_any"] > 0.15


def test_synthetic_trace_shape_weights_and_determinism():
    a = synthetic_trace(50, num_layers=4, seed=9)
    assert a.num_tokens == 50 and a.num_layers == 4 and a.num_experts == 8 and a.top_k == 2
    for tok, wtok in zip(a.routing, a.weights):
        for experts, w in zip(tok, wtok):
            assert len(experts) == 2 and len(set(experts)) == 2 and all(0 <= e < 8 for e in experts)
            assert w[0] >= w[1] > 0 and sum(w) == pytest.approx(1.0, abs=1e-3)
    assert synthetic_trace(50, num_layers=4, seed=9).routing == a.routing
    assert synthetic_trace(50, num_layers=4, seed=10).routing != a.routing
    other = synthetic_trace(30, num_layers=2, num_experts=6, top_k=3, seed=1)
    assert all(len(set(ex)) == 3 and max(ex) < 6 for tok in other.routing for ex in tok)


# ---------------------------------------------------------------------------- file format

def test_trace_round_trip(tmp_path):
    trace = synthetic_trace(20, num_layers=3, seed=4)
    path = tmp_path / "t.jsonl"
    assert write_trace(path, trace) == 60
    back = read_trace(path)
    assert back.header == trace.header
    assert back.routing == trace.routing
    flat = [w for tok in trace.weights for pair in tok for w in pair]
    assert [w for tok in back.weights for pair in tok for w in pair] == pytest.approx(flat)
    # without a header, and records in any order
    lines = path.read_text().splitlines()[1:]
    random.Random(0).shuffle(lines)
    (tmp_path / "n.jsonl").write_text("\n".join(lines) + "\n\n")
    bare = read_trace(tmp_path / "n.jsonl")
    assert bare.header == {} and bare.routing == trace.routing and bare.num_layers == 3
    assert simulate(bare, 3, "lfu").hit_rate == simulate(trace, 3, "lfu").hit_rate


HEADER = '{"header": {"model": "m", "num_layers": 2, "num_experts": 4, "top_k": 2}}'
OK0 = '{"token": 0, "layer": 0, "experts": [1, 2], "weights": [0.6, 0.4]}'
OK1 = '{"token": 0, "layer": 1, "experts": [0, 3], "weights": [0.7, 0.3]}'


@pytest.mark.parametrize("lines, where, message", [
    ([HEADER, OK0, '{"token": 0, "layer": 1, "experts": [0, 3]'], 3, "not valid JSON"),
    ([HEADER, OK0, '{"token": 0, "experts": [0, 3]}'], 3, "missing field.*layer"),
    ([HEADER, '{"token": 0, "layer": 0, "experts": [1, 1]}', OK1], 2, "duplicate expert"),
    ([HEADER, OK0, '{"token": 0, "layer": 1, "experts": [0, 4]}'], 3, "out of range for num_experts=4"),
    ([HEADER, OK0, '{"token": 0, "layer": 2, "experts": [0, 3]}'], 3, "layer 2 is out of range"),
    ([HEADER, OK0, '{"token": 0, "layer": 1, "experts": [0]}'], 3, "top_k=2"),
    ([HEADER, OK0, '{"token": -1, "layer": 1, "experts": [0, 3]}'], 3, "'token' must be"),
    ([HEADER, OK0, '{"token": 0, "layer": 1, "experts": [0, 3], "weights": [1]}'], 3, "'weights' must be"),
    ([HEADER, OK0, OK0], 3, "already given on line 2"),
    ([OK0, HEADER, OK1], 2, "header is only allowed on the first line"),
    ([HEADER, OK0, '[1, 2]'], 3, "expected a JSON object"),
    ([HEADER, OK0, '{"token": 0, "layer": 1, "experts": [0, 3]}'], 3, "'weights' missing here"),
    (['{"header": {"num_layers": 0}}', OK0], 1, "'num_layers' must be"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, where, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=message) as err:
        read_trace(path)
    assert f"{path}:{where}:" in str(err.value)


def test_incomplete_or_missing_trace(tmp_path):
    path = tmp_path / "gap.jsonl"
    path.write_text("\n".join([HEADER, OK0, '{"token": 1, "layer": 0, "experts": [1, 2], "weights": [0.5, 0.5]}',
                               '{"token": 1, "layer": 1, "experts": [1, 2], "weights": [0.5, 0.5]}']) + "\n")
    with pytest.raises(TraceError, match=r"gap.jsonl: incomplete trace: no record for token 0 layer 1"):
        read_trace(path)
    (tmp_path / "empty.jsonl").write_text(HEADER + "\n")
    with pytest.raises(TraceError, match="no records"):
        read_trace(tmp_path / "empty.jsonl")
    with pytest.raises(TraceError, match="cannot open trace"):
        read_trace(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------- CLI and bench

def _parser(generate_fn=None):
    parser = argparse.ArgumentParser(prog="mixoff")
    add_trace_parser(parser.add_subparsers(dest="command", required=True), generate_fn)
    return parser


def test_cli_synthetic_then_replay(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    args = _parser().parse_args(["trace", "synthetic", str(out), "--tokens", "60", "--layers", "3", "--seed", "1"])
    assert args.func(args) == 0
    assert read_trace(out).num_tokens == 60
    capsys.readouterr()

    args = _parser().parse_args(["trace", "replay", str(out), "--cache-size", "4", "--policy", "all", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["policies"]) == {"lru", "lfu", "lrfu", "belady"}
    assert report["cache_sizes"] == [4, 4, 4] and report["tokens"] == 60
    assert all(report["policies"]["belady"]["hit_rate"] >= p["hit_rate"] for p in report["policies"].values())

    args = _parser().parse_args(["trace", "replay", str(out), "-k", "2,3,4", "--policy", "lfu"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "lfu" in table and "belady" in table and "cache k=2-4 (1x2, 1x3, 1x4)" in table
    assert len([ln for ln in table.splitlines() if ln.strip().startswith(("0 ", "1 ", "2 ", "all"))]) == 4

    args = _parser().parse_args(["trace", "replay", str(out), "-k", "9"])
    assert args.func(args) == 2
    assert "between 1 and the number of experts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["trace", "replay", str(out), "-k", "x"])


def test_record_writes_engine_routing(tmp_path, capsys):
    calls = []

    def fake_generate(args):
        calls.append(args.prompt)
        return [[(0, 1), (2, 3)], [(1, 0), (3, 2)]], [[(0.6, 0.4), (0.9, 0.1)], [(0.5, 0.5), (0.7, 0.3)]], \
            {"num_experts": 4, "model": "tiny-test"}

    out = tmp_path / "r.jsonl"
    args = _parser(fake_generate).parse_args(
        ["trace", "record", "--prompt", "hi", "--max-new-tokens", "2", "--greedy", str(out)])
    assert args.func(args) == 0 and calls == ["hi"]
    t = read_trace(out)
    assert t.routing == [[(0, 1), (2, 3)], [(1, 0), (3, 2)]]
    assert t.weights[1][1] == (0.7, 0.3)
    assert t.header["model"] == "tiny-test" and t.header["prompt"] == "hi" and t.header["num_experts"] == 4
    assert t.header["greedy"] is True and t.header["num_layers"] == 2 and t.header["top_k"] == 2

    args.force = True                  # OUT exists now: replacing it takes --force
    assert record_main(args, lambda a: ([], None, {})) == 2
    assert "no tokens" in capsys.readouterr().err
    assert record_main(args, lambda a: ([[(0, 1)], [(0, 1), (2, 3)]], None, {})) == 2
    assert "different number of layers" in capsys.readouterr().err
    # without a generate_fn, record is wired to the engine (run in test_cli.py)
    default = _parser().parse_args(["trace", "record", "--prompt", "hi", str(out)])
    assert callable(default.func) and default.max_new_tokens == 64 and default.model == "tiny"


def test_bench_prints_one_json_object(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("trace_policies", REPO / "bench" / "trace_policies.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "t.jsonl"
    write_trace(path, synthetic_trace(40, num_layers=2, seed=3))
    assert bench.main(["--tokens", "40", "--sizes", "2,4", "--trace", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    for part in ("synthetic", "trace"):
        for k in ("2", "4"):
            row = out[part]["hit_rate"][k]
            assert set(row) >= {"lru", "lfu", "lrfu", "belady", "cold_bound"}
            assert row["belady"] >= max(row["lru"], row["lfu"], row["lrfu"])

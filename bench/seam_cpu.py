"""Same-process A/B of the CPU default path: the model through the ``qlinear(x, w, "torch")`` seam vs through
``quant.linear(x, w)`` (what model.py called before the seam), interleaved on the embedded tiny model, greedy
decode tokens/s (prefill excluded), medians. On a shared, noisy machine an A/B in one process is the
comparison that means something.

    python bench/seam_cpu.py [REPEATS]
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

torch.set_num_threads(1)
import mixoff_app.model as M  # noqa: E402
from mixoff_app import quant  # noqa: E402
from mixoff_app.config import NO_QUANT, CacheConfig, EngineConfig, QuantConfig, SamplingParams  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402

new = M.qlinear


def old(x, w, kernel="torch"):
    return quant.linear(x, w)


models = {}
for qname, q in (("quantized_4_2", QuantConfig()), ("dense", NO_QUANT)):
    eng = Engine.load(EngineConfig(model="tiny", device="cpu", quant=q, cache=CacheConfig(), max_context=256,
                                   kernel="torch"))      # the reference path this A/B is about
    prompt = list(range(5, 25))
    runs = {"old_quant_linear": [], "new_qlinear": []}
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        for name, fn in (("old_quant_linear", old), ("new_qlinear", new)):
            M.qlinear = fn
            eng.forget_kv()
            t0 = time.perf_counter()
            evs = list(eng.stream_ids(prompt, SamplingParams(max_new_tokens=32, greedy=True)))
            snap = eng.stats()
            n = sum(e.token_id is not None for e in evs if e.kind == "token")
            runs[name].append(n / (time.perf_counter() - t0 - snap.prefill_s))
    M.qlinear = new
    models[qname] = {k: {"median_tok_s": statistics.median(v), "runs": v} for k, v in runs.items()}
    models[qname]["ratio_new_vs_old"] = statistics.median(runs["new_qlinear"]) / statistics.median(runs["old_quant_linear"])
print(json.dumps({"benchmark": "seam_cpu", "threads": 1, "tokens": 32, "models": models}, indent=1))

"""Write tests/fixtures/backends: what vLLM and SGLang answer with their routing, for the remote-backend tests.

No vLLM or SGLang can run here (no GPU, no network), so these are written from the engines' documented formats
(sources in tests/fixtures/backends/README.md), not recorded from a running server. The routing values come from
our synthetic trace generator (calibrated to Mixtral's measured routing locality), so a replay of them behaves
like real routing rather than noise.

    python tools/make_backend_fixtures.py          # rewrites the files; the output is deterministic
"""
from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixoff_app.trace import synthetic_trace  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "backends"
CREATED = 1767225600                      # 2026-01-01, fixed so the files do not change between runs

VLLM_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
VLLM_TEXT = ("A mixture of experts sends each token to two of eight expert networks per layer, so only a quarter "
             "of the expert weights work on any token.")
SGLANG_MODEL = "Qwen/Qwen1.5-MoE-A2.7B-Chat"
SGLANG_TEXT = "Each token uses four of sixty experts."


def pieces(text: str, n: int) -> list[str]:
    """``text`` cut into ``n`` consecutive pieces (one per generated token, as a stream sends them)."""
    words = text.split(" ")
    cuts = [round(i * len(words) / n) for i in range(n + 1)]
    return [(" " if i else "") + " ".join(words[cuts[i]:cuts[i + 1]]) for i in range(n)]


def routing(tokens: int, layers: int, experts: int, top_k: int, seed: int) -> list:
    return [[list(ex) for ex in tok] for tok in synthetic_trace(tokens, layers, experts, top_k, seed).routing]


def write(name: str, data) -> None:
    path = OUT / name
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


def sse(events: list) -> str:
    return "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events) + "data: [DONE]\n\n"


def models(model: str, owner: str, max_len: int) -> dict:
    card = {"id": model, "object": "model", "created": CREATED, "owned_by": owner, "root": model, "parent": None,
            "max_model_len": max_len}
    if owner == "vllm":
        card["permission"] = [{"id": "modelperm-0", "object": "model_permission", "created": CREATED,
                               "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                               "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                               "organization": "*", "group": None, "is_blocking": False}]
    return {"object": "list", "data": [card]}


def vllm() -> None:
    """vLLM 0.21 with --enable-return-routed-experts: JSON lists, prompt's on the response, answer's on the choice."""
    prompt_len, gen_len = 14, 24
    rows = routing(prompt_len + gen_len, 32, 8, 2, seed=3)
    prompt, gen = rows[:prompt_len], rows[prompt_len:]
    usage = {"prompt_tokens": prompt_len, "total_tokens": prompt_len + gen_len, "completion_tokens": gen_len,
             "prompt_tokens_details": None}
    head = {"id": "chatcmpl-8f0c2a5d1e6b4a3c9d7e0f1a2b3c4d5e", "created": CREATED, "model": VLLM_MODEL}
    write("vllm_models.json", models(VLLM_MODEL, "vllm", 32768))
    write("vllm_chat.json", {
        **head, "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": VLLM_TEXT, "refusal": None,
                                             "annotations": None, "audio": None, "function_call": None,
                                             "tool_calls": [], "reasoning_content": None},
                     "logprobs": None, "finish_reason": "length", "stop_reason": None, "routed_experts": gen}],
        "service_tier": None, "system_fingerprint": None, "usage": usage, "prompt_logprobs": None,
        "prompt_token_ids": None, "kv_transfer_params": None, "prompt_routed_experts": prompt})
    chunk = {**head, "object": "chat.completion.chunk"}
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]}]
    texts = pieces(VLLM_TEXT, gen_len)
    for i, t in enumerate(texts):
        last = i == len(texts) - 1
        choice = {"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": "length" if last else None}
        if last:
            choice.update(stop_reason=None, routed_experts=gen)
        events.append({**chunk, "choices": [choice], **({"prompt_routed_experts": prompt} if last else {})})
    events.append({**chunk, "choices": [], "usage": usage})
    write("vllm_chat_stream.txt", sse(events))
    # vLLM after 0.21: one base64 .npy on the choice, every position but the last (never fed back)
    npy = io.BytesIO()
    np.save(npy, np.asarray(rows[:-1], dtype=np.int16), allow_pickle=False)
    newer = json.loads((OUT / "vllm_chat.json").read_text())
    del newer["prompt_routed_experts"]
    newer["choices"][0]["routed_experts"] = base64.b64encode(npy.getvalue()).decode()
    write("vllm_chat_npy.json", newer)


def sglang() -> None:
    """SGLang with --enable-return-routed-experts and return_routed_experts: base64 int32, flat, on sgl_ext."""
    prompt_len, gen_len = 9, 6
    rows = routing(prompt_len + gen_len - 1, 24, 60, 4, seed=5)
    flat = base64.b64encode(np.asarray(rows, dtype="<i4").tobytes()).decode()
    usage = {"prompt_tokens": prompt_len, "total_tokens": prompt_len + gen_len, "completion_tokens": gen_len,
             "prompt_tokens_details": None, "reasoning_tokens": 0}
    head = {"id": "5b1e9a0c7d2f4e6a8b3c1d0e9f8a7b6c", "created": CREATED, "model": SGLANG_MODEL}
    write("sglang_models.json", models(SGLANG_MODEL, "sglang", 8192))
    chunk = {**head, "object": "chat.completion.chunk"}
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None, "matched_stop": None}]}]
    texts = pieces(SGLANG_TEXT, gen_len)
    for i, t in enumerate(texts):
        last = i == len(texts) - 1
        choice = {"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": "stop" if last else None,
                  "matched_stop": 151645 if last else None}
        if last:
            choice["sgl_ext"] = {"routed_experts": flat}
        events.append({**chunk, "choices": [choice]})
    events.append({**chunk, "choices": [], "usage": usage})
    write("sglang_chat_stream.txt", sse(events))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    vllm()
    sglang()

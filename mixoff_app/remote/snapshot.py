"""What the panel shows for a backend that reports no cache of ours (vLLM, SGLang, another OpenAI-compatible
server): the latest answer's routing as the backend returned it, a replay of it through our cache simulator,
and what this page measured itself. What the backend did not send is absent here, with the reason."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

from .cache_replay import ReplayRow


@dataclass(frozen=True)
class RemoteSnapshot:
    seq: int                          # changes whenever anything shown changes
    where: str
    backend: str                      # vllm | sglang | openai | unknown
    model: str
    connected: bool
    problem: str                      # why the backend cannot be used right now ("" when it can)
    generating: bool
    answers: int                      # answers this page has had from the backend
    num_moe_layers: Optional[int]
    num_experts: Optional[int]        # None: not known (the routing shows only a lower bound)
    top_k: Optional[int]
    # The latest answer: shown only to the session that asked it, and to the operator.
    answer_tokens: int = 0            # usage.completion_tokens, else the pieces counted
    prompt_tokens: int = 0            # usage.prompt_tokens (0: not sent)
    ttft_s: float = 0.0               # measured here: request sent -> first text
    decode_s: float = 0.0             # first text -> last text
    tokens_per_s: float = 0.0         # measured here over the decode
    finish_reason: str = ""
    routing: tuple = ()               # generated tokens -> expert layer -> experts
    prompt_routing: tuple = ()        # prompt tokens -> expert layer -> experts
    routing_note: str = ""            # why there is no routing, when there is none
    replay: tuple[ReplayRow, ...] = ()
    replaying: bool = False           # the replay is being computed (seconds, for a long answer of many experts)
    replay_k: int = 0                 # the k the operator chose (Cache settings)

    def without_answer(self) -> "RemoteSnapshot":
        """For someone whose answer the latest one was not."""
        return replace(self, answer_tokens=0, prompt_tokens=0, ttft_s=0.0, decode_s=0.0, tokens_per_s=0.0,
                       finish_reason="", routing=(), prompt_routing=(), routing_note="", replay=(),
                       replaying=False)

    def to_dict(self) -> dict:
        return asdict(self)

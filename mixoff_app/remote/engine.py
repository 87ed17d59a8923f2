"""RemoteEngine: the engine seam (``stream_chat`` -> TokenEvents, ``stats()``, ``info``, ``limits``) over an
OpenAI-compatible server, so the page drives our ``serve`` on a GPU box, vLLM or SGLang without learning HTTP.

Nothing of a model is loaded here. Against our own server ``stats()`` is the server's own snapshot (the full live
panel); against another engine it is a ``RemoteSnapshot``: each answer's routing as the backend returned it, what
a k-per-layer cache would have done with it, and the latency and speed measured here.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

from ..config import CacheConfig, ConfigError, SamplingParams
from ..events import TokenEvent
from ..limits import InputLimits, check_chars
from ..messages import conversation
from .cache_replay import CardPlan, candidate_ks, card_plan, replay_answer
from .client import BackendClient, BackendError
from .config import BackendConfig
from .info import RemoteInfo, from_models, with_routing_shape
from .routing import AnswerRouting, read_routing
from .server_stats import snapshot_from_dict
from .snapshot import RemoteSnapshot

DEFAULT_CONTEXT = 4096         # limits the page puts on a message when the server does not say its context
STATS_EVERY_S = 0.25           # one stats fetch serves every viewer's panel tick within this
# OpenAI's finish reasons -> ours (ui/chat.py FINISH_TEXT): "stop" is the end of the answer or a stop string.
FINISH = {"stop": "eos", "length": "length", "abort": "cancelled", "content_filter": "stop", "tool_calls": "eos"}


@dataclass
class _Answer:
    """One answer as this page saw it come in."""
    session: Optional[str]
    started: float
    first: float = 0.0
    last: float = 0.0
    pieces: int = 0
    usage: dict = field(default_factory=dict)
    finish: str = ""
    final: dict = field(default_factory=dict)       # the chunk with finish_reason: where the routing rides
    routing: AnswerRouting = AnswerRouting()
    replays: dict = field(default_factory=dict)     # k -> replay rows (computed once, when first shown)


def _seen(routing: AnswerRouting) -> int:
    """How many experts the routing shows at least (the highest id + 1)."""
    ids = [e for rows in (routing.prompt or (), routing.generated or ()) for tok in rows for ex in tok for e in ex]
    return 1 + max(ids, default=-1)


class RemoteEngine:
    def __init__(self, config: BackendConfig, max_input_chars: Optional[int] = None) -> None:
        self.config = config
        self._client = BackendClient(config)
        self._max_input_chars = max_input_chars
        self._lock = threading.Lock()
        self._info = RemoteInfo(where=config.where, reason=f"--backend {config.where}: not reached yet",
                                problem=f"the backend at {config.where} has not been reached yet")
        self._probed = 0.0
        self._answer: Optional[_Answer] = None
        self._answers = self._seq = self._streams = 0
        self._server_stats: tuple[float, Any] = (0.0, None)
        self._card: Optional[CardPlan] = None
        self.answer_session: Optional[str] = None

    # ---- the backend ----------------------------------------------------------------------------
    def connect(self, timeout: Optional[float] = None) -> RemoteInfo:
        """Ask the server what it serves (``/v1/models``, and ``/v1/mixoff/info`` from our own); raises
        BackendError with one sentence when it cannot be used."""
        self._probed = time.monotonic()
        try:
            models = self._client.get("/models", timeout)
            owner = str(((models.get("data") or [{}])[0] or {}).get("owned_by", "")) if isinstance(models, dict) else ""
            server = self._client.get("/mixoff/info", timeout) if owner == "mixoff" else None
            info = from_models(self.config.where, models, self.config.model, server)
        except BackendError as exc:
            self._set_problem(str(exc))
            raise
        except (ValueError, AttributeError, TypeError) as exc:
            msg = f"{self.config.where} does not answer like an OpenAI-compatible server: {exc}"
            self._set_problem(msg)
            raise BackendError(msg) from None
        with self._lock:
            old = self._info
            if old.connected and old.model == info.model and old.num_moe_layers and not info.num_moe_layers:
                info = replace(info, num_moe_layers=old.num_moe_layers, top_k=old.top_k, shape_from=old.shape_from)
            if old.connected and info.backend != "mixoff":
                info = replace(info, cache=old.cache)
            self._info, self._seq = info, self._seq + 1
        return info

    def _set_problem(self, message: str) -> None:
        with self._lock:
            self._info = replace(self._info, connected=False, problem=message)
            self._seq += 1

    def _connected(self) -> RemoteInfo:
        info = self._info
        return info if info.connected else self.connect()

    @property
    def info(self) -> RemoteInfo:
        """What is known of the backend; while it is unreachable, asked again every few seconds (briefly)."""
        if not self._info.connected and time.monotonic() - self._probed > 2 * self.config.probe_s:
            try:
                self.connect(self.config.probe_s)
            except BackendError:
                pass
        return self._info

    @property
    def limits(self) -> InputLimits:
        return InputLimits.for_context(self._info.max_context or DEFAULT_CONTEXT, self._max_input_chars)

    @property
    def busy(self) -> bool:
        return self._streams > 0

    # ---- chat -----------------------------------------------------------------------------------
    def _checked(self, messages: Any) -> list[dict]:
        """The engine's rule for a conversation (``messages.py``), refused here at once rather than by the server."""
        msgs = [t.message() for t in conversation(messages)]
        check_chars("message", msgs[-1]["content"], self.limits.message)
        if not msgs[-1]["content"].strip():
            raise ValueError("the message is empty: type something to ask")
        return msgs

    def _body(self, info: RemoteInfo, messages: list[dict], params: SamplingParams) -> dict:
        body = {"model": info.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": params.max_new_tokens, "temperature": 0.0 if params.is_greedy else params.temperature,
                "top_p": 1.0 if params.is_greedy else params.top_p}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_k and info.backend in ("vllm", "sglang"):
            body["top_k"] = params.top_k
        if info.returns_routing:
            # Ours and SGLang's per request; vLLM has only its server flag (and ignores the field with a warning).
            body["return_routed_experts"] = True
        return body

    def stream_chat(self, messages: list[dict], params: SamplingParams, cancel: Optional[threading.Event] = None,
                    session: Optional[str] = None) -> Iterator[TokenEvent]:
        """Bad input, an unreachable server or a refused key fail here, before anything streams."""
        msgs = self._checked(messages)
        info = self._connected()
        return self._stream(info, self._body(info, msgs, params), cancel, session)

    def _stream(self, info: RemoteInfo, body: dict, cancel: Optional[threading.Event], session: Optional[str]
                ) -> Iterator[TokenEvent]:
        answer = _Answer(session, time.perf_counter())
        with self._lock:
            self._streams += 1
            self._answer, self.answer_session, self._seq = answer, session, self._seq + 1
        try:
            # Leaving this block (Stop, the page's client gone, an error) closes the connection: the server sees
            # the disconnect and stops generating.
            with self._client.stream("/chat/completions", body) as events:
                for ev in events:
                    if cancel is not None and cancel.is_set():
                        answer.finish = "cancelled"
                        break
                    text = self._take(answer, ev)
                    if text:
                        yield TokenEvent("token", text, None, answer.pieces - 1, answer.last - answer.started)
                else:
                    if not answer.finish:
                        raise BackendError(f"the backend at {self.config.where} ended the answer without saying why "
                                           f"(no finish_reason): the connection was probably cut; the text so far "
                                           f"is kept")
        except BackendError as exc:
            answer.finish = answer.finish or "error"
            if exc.unreachable:
                self._set_problem(str(exc))
            raise
        finally:
            self._settle(info, answer)
        yield TokenEvent("done", "", None, 0, time.perf_counter() - answer.started,
                         finish_reason=FINISH.get(answer.finish, answer.finish or "eos"),
                         prompt_tokens=answer.usage.get("prompt_tokens"))

    @staticmethod
    def _take(answer: _Answer, ev: dict) -> str:
        """One event of the stream into ``answer``; returns its new text."""
        if isinstance(ev.get("usage"), dict):
            answer.usage = ev["usage"]
        choice = (ev.get("choices") or [None])[0]
        if not isinstance(choice, dict):
            return ""
        if choice.get("finish_reason"):
            answer.finish, answer.final = str(choice["finish_reason"]), ev
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        text = delta.get("content") or choice.get("text") or ""
        if isinstance(text, str) and text:
            now = time.perf_counter()
            answer.first, answer.last = answer.first or now, now
            answer.pieces += 1
            return text
        return ""

    def _settle(self, info: RemoteInfo, answer: _Answer) -> None:
        """The answer is over: read its routing (once) and learn the model's shape from it if nobody said it."""
        usage = answer.usage
        top_k = self._info.top_k
        answer.routing = read_routing(answer.final, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                                      top_k) if answer.final else AnswerRouting()
        with self._lock:
            self._streams -= 1
            shape = answer.routing.shape
            if shape and self._info.connected:
                self._info = with_routing_shape(self._info, *shape, _seen(answer.routing))
            self._answers += 1
            self._seq += 1

    # ---- inspection -----------------------------------------------------------------------------
    @property
    def last_routing(self) -> list:
        ans = self._answer
        return list(ans.routing.generated or ()) if ans is not None else []

    @property
    def last_usage(self) -> dict:
        """The latest answer's ``usage`` as the server sent it ({} before any)."""
        return dict(self._answer.usage) if self._answer is not None else {}

    def routing_note(self) -> str:
        """Why the latest answer has no routing ("" when it has)."""
        return self._routing_note(self._info, self._answer) if self._answer is not None else ""

    def stats(self, session: object = ...) -> Any:
        """Our server's own snapshot (the live panel), else this page's view of the latest answer. While our server
        cannot be asked, its last snapshot stays on the panel beneath the reason (the header says it too).
        ``session``: a page user, who sees the latest answer's figures only when it was theirs (the server knows
        this page by its one key, so it cannot tell the page's users apart: the page does)."""
        snap = self._snapshot()
        if session is not ... and session != self.answer_session:
            return snap.without_answer()
        return snap

    def _snapshot(self) -> Any:
        info = self.info
        if info.backend == "mixoff":
            snap = self._server_snapshot() if info.connected else None
            if snap is None:
                snap = self._server_stats[1]
            if snap is not None:
                return snap
        return self._remote_snapshot(self._info)

    def _server_snapshot(self):
        at, snap = self._server_stats
        if time.monotonic() - at < STATS_EVERY_S and snap is not None:
            return snap
        try:
            snap = snapshot_from_dict(self._client.get("/mixoff/stats", self.config.probe_s))
        except BackendError as exc:
            self._set_problem(str(exc))
            return None
        except ValueError as exc:
            self._set_problem(f"the server at {self.config.where} sent stats this page cannot read: {exc}")
            return None
        self._server_stats = (time.monotonic(), snap)
        return snap

    def _remote_snapshot(self, info: RemoteInfo) -> RemoteSnapshot:
        ans = self._answer
        base = RemoteSnapshot(seq=self._seq, where=info.where, backend=info.backend, model=info.model,
                              connected=info.connected, problem=info.problem, generating=self._streams > 0,
                              answers=self._answers, num_moe_layers=info.num_moe_layers, num_experts=info.num_experts,
                              top_k=info.top_k, replay_k=info.cache.sizes[0])
        if ans is None:
            return base
        generated = ans.routing.generated or ()
        replay = self._replay(info, ans)
        tokens = int(ans.usage.get("completion_tokens") or ans.pieces)
        decode = ans.last - ans.first if ans.pieces > 1 else 0.0
        return replace(base, answer_tokens=tokens, prompt_tokens=int(ans.usage.get("prompt_tokens") or 0),
                       ttft_s=ans.first - ans.started if ans.first else 0.0, decode_s=decode,
                       tokens_per_s=(tokens - 1) / decode if decode > 0 and tokens > 1 else 0.0,
                       finish_reason=ans.finish, routing=generated, prompt_routing=ans.routing.prompt or (),
                       routing_note=self._routing_note(info, ans), replay=replay or (), replaying=replay is None)

    def _routing_note(self, info: RemoteInfo, ans: _Answer) -> str:
        if ans.routing.generated:
            return ""
        if ans.routing.problem:
            return ans.routing.problem
        if ans.finish in ("", "cancelled", "error"):
            return "the answer was stopped before the backend sent its routing (it comes with the end of an answer)"
        if not info.returns_routing:
            return f"{info.engine_name} does not document returning routing, so none was asked for"
        if info.backend == "vllm":
            return "vLLM sent no routing: start it with --enable-return-routed-experts"
        return f"{info.engine_name} sent no routing with this answer"

    def _replay(self, info: RemoteInfo, ans: _Answer) -> Optional[tuple]:
        """The replay rows at the chosen k; None while they are being computed. A long answer of a model with many
        experts takes seconds in pure Python (Qwen3-30B-A3B, 256 tokens: about 12 s here), so a thread does it and
        the panel says so meanwhile, instead of a panel tick waiting on it."""
        rows = ans.routing.generated
        if not rows:
            return ()
        k = info.cache.sizes[0]
        with self._lock:
            if k in ans.replays:
                return ans.replays[k]
            ans.replays[k] = None
        threading.Thread(target=self._replay_work, args=(info, ans, k), name="mixoff-replay", daemon=True).start()
        return None

    def _replay_work(self, info: RemoteInfo, ans: _Answer, k: int) -> None:
        rows = ans.routing.generated
        experts = max(info.num_experts or 0, info.experts_seen)
        if self._card is None and info.num_experts:
            self._card = card_plan((info.model, *info.models)) or CardPlan("", (), 0)
        card = self._card if self._card and self._card.sizes else None
        try:
            out = replay_answer(rows, experts, candidate_ks(experts, len(rows[0][0]), min(k, experts)), card)
        except ValueError:       # an expert id beyond the model's count: the routing does not fit what was said
            out = ()
        with self._lock:
            ans.replays[k] = out
            self._seq += 1

    def reconfigure_cache(self, cache: CacheConfig) -> None:
        """Ours: the cache is the server's, changed where it runs. Others: the k the panel replays answers with."""
        info = self._info
        if info.backend == "mixoff":
            raise ConfigError(f"the expert cache belongs to the server at {info.where}: restart its "
                              f"`python -m mixoff_app serve` with --cache-size, --policy or --prefetch")
        if cache.prefetch:
            raise ConfigError("the replay of a remote answer does not model prefetching: set prefetch to 0")
        with self._lock:
            self._info = replace(self._info, cache=CacheConfig(sizes=tuple(cache.sizes or (2,))[:1],
                                                               policy=cache.policy))
            self._seq += 1

    def close(self) -> None:
        self._client.close()

"""Engine: load a model once, then stream chat answers and expose a stats snapshot.

The contract the UI and the CLI use: ``Engine.load(EngineConfig)``, ``stream_chat(messages, params)``
yielding ``TokenEvent``s, ``stats()`` returning a ``StatsSnapshot``, ``reconfigure_cache(CacheConfig)``.
Answers run together: the scheduler's step loop batches every running answer into one decode step
(``scheduler.py``); each answer has a KV slot of its own, reused when the same session's new prompt extends the
tokens already in it (the usual multi-turn chat); another session's tokens are never reused.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .config import (
    DEFAULT_MAX_BATCH,
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    QuantConfig,
    SamplingParams,
    format_k,
)
from .events import TokenEvent
from .expert_cache import ExpertCache
from .families import DEFAULT_FAMILY
from .hub import REFERENCE_REPO, resolve, tokenizer_source
from .limits import InputLimits, InputTooLong, check_chars, fit_conversation, template_overhead
from .memory import read_memory
from .messages import Turn, conversation
from .model import MoEModel, Prefetcher
from .scheduler import Answer, Scheduler
from .stats import Stats, StatsSnapshot

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EngineInfo:
    model: str                 # what was asked for
    model_path: str
    model_name: str            # for display
    reason: str                # why this model (e.g. the no-GPU fallback)
    device: str
    dtype: str
    quant: str
    checkpoint_format: str     # "hf" | "reference" | "mixoff"
    num_moe_layers: int        # expert layers: what the cache, stats, panel and traces count
    num_experts: int
    top_k: int
    max_context: int
    cache: CacheConfig
    gpu_name: Optional[str]
    expert_bytes: int          # one expert in its stored (quantized) form
    family: str = DEFAULT_FAMILY
    expert_layers: tuple[int, ...] = ()   # decoder layer of each expert layer (labels)
    decoder_layers: int = 0               # all decoder layers, dense ones included
    shared_expert: bool = False
    kernel: str = "torch"      # the quantized matmul in use: "triton" (fused kernels), "cpu" (torch's CPU kernels) or "torch"
    cpu_experts: str = "off"   # what --cpu-experts resolved to: "off", "all" or "cost" (cpu_experts.py)


def default_model() -> tuple[str, str]:
    """(model, reason) when the user names none."""
    if torch.cuda.is_available():
        return REFERENCE_REPO, f"CUDA GPU found ({torch.cuda.get_device_name(0)}): running the pre-quantized Mixtral-8x7B-Instruct"
    return "tiny", "no CUDA GPU found: running the embedded tiny demo model (Mixtral architecture, small)"


def resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch "
                          "(check the driver and that the CUDA build of torch is installed), or use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda:0")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}: use cpu or cuda")
    return dev


def resolve_dtype(name: Optional[str], device: torch.device,
                  capability: Optional[tuple[int, int]] = None) -> torch.dtype:
    """The compute dtype: float16 on CUDA and float32 on the CPU unless asked; bfloat16 only on GPUs that
    compute in it (compute capability 8.0+; older ones emulate it, slowly)."""
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
             None: torch.float16 if device.type == "cuda" else torch.float32}.get(name)
    if dtype is None:
        raise ConfigError(f"unsupported dtype {name!r}: use float16, bfloat16 or float32")
    if dtype == torch.bfloat16 and device.type == "cuda":
        cap = capability or torch.cuda.get_device_capability(device)
        if tuple(cap) < (8, 0):
            raise ConfigError(f"--dtype bfloat16 needs a GPU of compute capability 8.0 or newer (this one is "
                              f"{cap[0]}.{cap[1]}, where bfloat16 is emulated and slow): use --dtype float16")
    return dtype


def check_prefetch(cache: CacheConfig, num_experts: int) -> None:
    """A prefetch wider than the experts would break every answer (top-k of more than there are)."""
    if cache.prefetch > num_experts:
        raise ConfigError(f"prefetch {cache.prefetch} is more than the {num_experts} experts per layer of this "
                          f"model: use 0 to {num_experts}")


def _peek(folder: Path, config: EngineConfig) -> tuple:
    """(cfg, quant in memory, checkpoint format or None): from the weights' headers when they are here, else from
    config.json alone (a hub model before its download; the format is then not known yet)."""
    from .checkpoints import CheckpointError, peek_checkpoint, read_config
    try:
        return peek_checkpoint(folder, config.quant)
    except (CheckpointError, OSError):
        cfg = read_config(folder)
        return cfg, config.quant.for_family(cfg.family), None


def _memory_plan(config: EngineConfig, peeked: tuple, device: torch.device, dtype: torch.dtype, name: str,
                 kernel: str = "torch"):
    """The planner, on the user's k, placement and batch, sized in the formats held in memory (``_held``): fills
    in what ``config.cache`` leaves None, checks what it fixes; ConfigError when that cannot fit. Without
    ``--max-batch``, as many answers at once (one KV cache each) as fit, up to DEFAULT_MAX_BATCH, in memory the
    expert cache does not need: one chat on a small card keeps every expert slot it would have alone."""
    from .plan import plan_for
    cfg, _quant, fmt = peeked
    held, converted = _held(peeked, kernel)
    cache = config.cache
    fixed = None if cache.sizes is None else cache.layer_sizes(cfg.num_moe_layers, cfg.num_experts)

    def plan(n: int):
        return plan_for(cfg, held, min(config.max_context, cfg.max_position_embeddings), device=device,
                        dtype=dtype, placement=cache.placement, sizes=fixed, vram_budget=config.vram_budget,
                        ram_budget=config.ram_budget, disk_ok=fmt == "mixoff" and not converted, model_name=name,
                        sequences=n)

    if config.max_batch is not None:
        p = plan(config.max_batch)
        if not p.feasible:
            raise ConfigError(f"{name} with --max-batch {config.max_batch} does not fit: {p.reason}")
        return p
    alone = plan(1)
    if not alone.feasible:
        raise ConfigError(f"{name} does not fit: {alone.reason}")
    for n in range(DEFAULT_MAX_BATCH, 1, -1):
        p = plan(n)
        if p.feasible and sum(p.sizes) >= sum(alone.sizes) and p.placement == alone.placement:
            return p
    return alone


def _precheck(config: EngineConfig, device: torch.device, dtype: torch.dtype, made: dict, folder: Path,
              kernel: str = "torch") -> None:
    """Before any weight is downloaded (a hub model: from its config.json) or read (a local folder: from the
    weights' headers): refuse what cannot fit, the user's k and placement included. A plan made from the
    checkpoint itself is kept in ``made`` for the plan step, so a local model is planned once."""
    if not config.planned(device.type):
        return
    peeked = _peek(folder, config)
    p = _memory_plan(config, peeked, device, dtype, config.model, kernel)
    if peeked[2] is not None:
        made[str(folder)] = (peeked, p)


@dataclass(frozen=True)
class Placed:
    """What the plan step settled: the checkpoint's shape and format, k per layer and the placement."""
    cfg: ModelConfig
    quant: QuantConfig
    checkpoint_format: str
    max_seq: int
    sizes: tuple[int, ...]
    placement: str
    plan: object = None          # the memory plan, when one was made
    max_batch: int = 1           # answers decoded together: one KV slot each


def _hold(kernel: str):
    """On the CPU kernel path the weights are held in its formats (cpu_weights.cpu_quant), else as stored (None)."""
    if kernel != "cpu":
        return None
    from .cpu_weights import cpu_hold
    from .kernels.cpu import probe
    return cpu_hold(probe().layout)


def _held(peeked: tuple, kernel: str) -> tuple[QuantConfig, bool]:
    """(the quantization held in memory, whether the experts are converted at load from what is stored)."""
    cfg, quant, _fmt = peeked
    hold = _hold(kernel)
    held = hold(quant, cfg) if hold else quant
    return held, held.experts != quant.experts


def _plan(config: EngineConfig, resolved, device: torch.device, dtype: torch.dtype, progress: Progress,
          made: Optional[dict] = None, kernel: str = "torch") -> Placed:
    """k per layer and the placement: the planner fills in what ``config.cache`` leaves None (on a GPU or
    under a budget, and checks what it fixes); elsewhere None means every expert, inclusive. The precheck's
    plan is used when it was made from this checkpoint (a hub model is planned again once its weights are
    here: only then is its format, and so its in-memory quantization, known). Sizes are those of the formats
    held in memory (``_hold``); experts converted at load cannot be read from disk as stored."""
    from .checkpoints import peek_checkpoint
    earlier = (made or {}).get(str(resolved.path))
    peeked = earlier[0] if earlier else peek_checkpoint(resolved.path, config.quant)
    cfg, quant, fmt = peeked
    held, converted = _held(peeked, kernel)
    max_seq = min(config.max_context, cfg.max_position_embeddings)
    memory_plan = None
    if config.planned(device.type):
        memory_plan = earlier[1] if earlier else _memory_plan(config, peeked, device, dtype, resolved.name, kernel)
        sizes, placement = memory_plan.sizes, memory_plan.placement
        progress(f"memory plan: {memory_plan.summary()}")
    else:
        cache = config.cache
        sizes, placement = cache.layer_sizes(cfg.num_moe_layers, cfg.num_experts), cache.placement or "inclusive"
    if placement == "disk" and fmt != "mixoff":
        raise ConfigError(f"--placement disk reads experts straight from a mixoff-format checkpoint, and "
                          f"{resolved.path} is {fmt}-format: convert it once with "
                          f"`python -m mixoff_app quantize {config.model} OUT_FOLDER` and pass --model OUT_FOLDER")
    if placement == "disk" and converted:
        raise ConfigError(f"--placement disk reads experts as {resolved.path} stores them "
                          f"({_stored(quant.experts)}), and the CPU kernels hold them as {held.experts.describe()}: "
                          f"write them in this CPU's format once with `python -m mixoff_app quantize {config.model} "
                          f"OUT_FOLDER --for-cpu`, or use --kernel torch (the reference path, slower)")
    return Placed(cfg, quant, fmt, max_seq, tuple(sizes), placement, memory_plan,
                  memory_plan.sequences if memory_plan is not None else config.max_batch or DEFAULT_MAX_BATCH)


def _stored(spec) -> str:
    if spec.packing == "int4":
        return f"{spec.describe()}, packed for another kind of CPU (int4 layout {spec.int4_layout})"
    return spec.describe()


def _build(config: EngineConfig, path: Path, placed: Placed, device: torch.device, dtype: torch.dtype,
           kernel: str, progress: Progress) -> tuple:
    """Read the checkpoint into the trunk and the placement's store, then the cache and the model; measure
    what it took against the budgets. Returns (loaded, model, stats, measured)."""
    from .checkpoints import load_checkpoint_placed
    from .memory import device_tensor_bytes, rss_bytes
    from .stores import make_store
    sizes, placement, pin = placed.sizes, placed.placement, device.type == "cuda"
    if kernel == "cpu":
        _say_cpu_formats(placed, progress)
    rss0 = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        loaded = load_checkpoint_placed(
            path, config.quant, device, dtype,
            lambda cfg, elayout, _fmt, folder: make_store(placement, cfg, elayout, sizes, device, folder, pin),
            progress=progress, hold=_hold(kernel))
    except torch.cuda.OutOfMemoryError:
        raise ConfigError("not enough GPU memory for the attention, embeddings and KV cache of this model: "
                          "use a smaller --max-context, free the GPU, or run on --device cpu") from None
    cfg = loaded.cfg
    stats = Stats(cfg.num_moe_layers, cfg.num_experts, cfg.top_k, sizes, config.cache.policy, placement)
    try:
        cache = ExpertCache(loaded.store, sizes, config.cache.policy, device, stats)
        model = MoEModel(cfg, loaded.trunk, cache, stats, placed.max_seq, device, dtype, kernel=kernel,
                         kv_slots=placed.max_batch)
    except torch.cuda.OutOfMemoryError:
        raise ConfigError(f"not enough GPU memory for {sum(sizes)} expert slots "
                          f"({loaded.store.layout.nbytes / 2**20:.1f} MiB each): lower --cache-size") from None
    measured = {"device_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                 else device_tensor_bytes(model)),
                "rss_growth": rss_bytes() - rss0}
    for key, budget, what in (("device_bytes", config.vram_budget, "--vram-budget"),
                              ("rss_growth", config.ram_budget, "--ram-budget")):
        if budget is not None and measured[key] > budget:
            progress(f"warning: loading used {measured[key] / 2**20:.1f} MiB against {what} "
                     f"{budget / 2**20:.1f} MiB")
    if kernel == "triton" and device.type == "cuda":
        progress("preparing the fused kernels (compiled once, then cached by Triton)")
        _warm_up_kernels(model, loaded.store.layout, device, dtype)
    if config.cache.prefetch:
        model.prefetcher = Prefetcher(config.cache.prefetch, config.cache.prefetch_layers)
    model.cpu_experts = _cpu_experts(config, loaded.store, placement, device, dtype, kernel, stats, progress)
    if config.cuda_graphs:
        from .cuda_graphs import DecodeGraphs
        model.graphs = DecodeGraphs(model)
    progress(f"device cache: {format_k(sizes)} experts per layer on {device} "
             f"({cache.device_bytes / 2**20:.1f} MiB), policy {config.cache.policy}")
    return loaded, model, stats, measured


def _cpu_experts(config: EngineConfig, store, placement: str, device: torch.device, dtype: torch.dtype,
                 kernel: str, stats: Stats, progress: Progress):
    """``--cpu-experts`` resolved (``cpu_experts.resolve_mode``), measured at load where it will run; None: off."""
    from . import cpu_experts as cx
    try:
        mode, why = cx.resolve_mode(config.cpu_experts, device, placement)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    stats.cpu_experts_mode = mode
    if mode == "off":
        if config.cpu_experts != "off":
            progress(f"cpu experts: {config.cpu_experts} -> off ({why})")
        return None
    costs = cx.measure(store, device, kernel, dtype)
    progress(f"cpu experts: {config.cpu_experts} -> {mode} ({why}); measured {costs.describe()}")
    return cx.CpuExperts(mode, cx.CpuSide(store, device, kernel, dtype), stats, costs)


def _say_cpu_formats(placed: Placed, progress: Progress) -> None:
    """One line per weight family that stays on the reference path, and why (said at load, never mid-answer)."""
    from .cpu_weights import cpu_quant
    from .kernels.cpu import probe
    for note in cpu_quant(placed.quant, placed.cfg, probe().layout)[1]:
        progress(note)


def _warm_up_kernels(model: MoEModel, layout, device: torch.device, dtype: torch.dtype) -> int:
    """Compile and tune the fused kernels for this model's weight formats: attention from the first layer, a
    dense MLP and a shared expert where the model has them, experts from a zero-filled expert in the store's
    layout (no cache traffic, no stats)."""
    from .kernels import warm_up
    from .quant import QWeight
    lw = model.trunk.layers[0]
    weights = [w for w in (lw.wq, lw.wk, lw.wv, lw.wo, lw.wq_a, lw.wq_b, lw.wkv_a) if isinstance(w, QWeight)]
    pairs = []
    trunk_mlps = [m for layer in model.trunk.layers for m in (layer.mlp, layer.shared) if m is not None]
    for mlp in {(m.w1.shape, type(m.w1)): m for m in trunk_mlps}.values():       # one per shape
        if isinstance(mlp.w1, QWeight):
            weights += [mlp.w1, mlp.w2]
            pairs.append((mlp.w1, mlp.w3))
    if layout.spec.enabled:
        ew = layout.weights(torch.zeros(layout.nbytes, dtype=torch.uint8, device=device))
        weights += list(ew)
        pairs.append((ew.w1, ew.w3))
    return warm_up(weights, dtype, swiglu_pairs=pairs)


def _tokenizer(config: EngineConfig, resolved, cfg: ModelConfig, progress: Progress) -> tuple:
    """(tokenizer, end-of-sequence ids): the tokenizer must bring a chat template."""
    from transformers import AutoTokenizer
    tok_dir = tokenizer_source(resolved.path, resolved.repo_id, config.tokenizer, progress)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))     # never trust_remote_code
    from .validation import check_vocab
    check_vocab(len(tokenizer), cfg.vocab_size, str(tok_dir))
    if tokenizer.chat_template is None:
        raise ConfigError(f"the tokenizer in {tok_dir} has no chat template; pass --tokenizer with one that does")
    eos = {i for i in (tokenizer.eos_token_id, cfg.eos_token_id) if i is not None}
    gen_cfg = Path(resolved.path) / "generation_config.json"
    if gen_cfg.exists():
        e = json.loads(gen_cfg.read_text()).get("eos_token_id")
        eos |= set(e if isinstance(e, list) else [e] if e is not None else [])
    return tokenizer, eos


def _info(config: EngineConfig, resolved, loaded, cache: CacheConfig, max_seq: int, device: torch.device,
          dtype: torch.dtype, reason: str, kernel: str, cpu_experts: str = "off") -> EngineInfo:
    cfg, q = loaded.cfg, loaded.quant
    return EngineInfo(
        model=config.model, model_path=str(resolved.path), model_name=resolved.name,
        reason=reason or f"model {config.model!r} as asked", device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        quant=q.describe(), checkpoint_format=loaded.checkpoint_format,
        num_moe_layers=cfg.num_moe_layers, num_experts=cfg.num_experts, top_k=cfg.top_k, max_context=max_seq,
        family=cfg.family, expert_layers=cfg.moe_layers, decoder_layers=cfg.num_layers,
        shared_expert=bool(cfg.shared_intermediate_size), cache=cache,
        gpu_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        expert_bytes=loaded.store.layout.nbytes, kernel=kernel, cpu_experts=cpu_experts)


class Engine:
    def __init__(self, config: EngineConfig, info: EngineInfo, model: MoEModel, tokenizer, stats: Stats,
                 eos_ids: set[int]) -> None:
        self.config, self.info, self.model, self.tokenizer = config, info, model, tokenizer
        self._stats, self.eos_ids = stats, eos_ids
        self.scheduler = Scheduler(model, stats, max_batch=model.kv_slots, per_client=config.per_client,
                                   max_waiting=config.max_waiting)
        self._overhead: Optional[int] = None  # chat-template tokens per turn, measured once
        self.limits = InputLimits.for_context(info.max_context, config.max_input_chars)
        self.memory_plan = self.memory_measured = None    # set by load() when it planned memory
        self.quant, self.dtype = config.quant, None

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig, progress: Optional[Progress] = None, reason: str = "") -> "Engine":
        """resolve -> plan -> build -> tokenizer -> info; a configuration that cannot fit is refused at the
        plan, before anything is allocated."""
        progress = progress or (lambda msg: None)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        from .kernels import resolve_kernel
        kernel = resolve_kernel(config.kernel, device)       # before any download: a bad --kernel fails at once
        if device.type == "cpu" and config.kernel in ("auto", "cpu"):
            from .kernels.cpu import probe
            progress(f"kernel {kernel}: {probe().describe()}" + ("" if kernel == "cpu" else "; using the reference "
                     "path (dequantize, then matmul)"))
        if config.cuda_graphs and device.type != "cuda":
            raise ConfigError("--cuda-graphs needs a CUDA GPU (the CPU path has no graphs to replay)")
        made: dict = {}
        resolved = resolve(config.model, progress, precheck=partial(_precheck, config, device, dtype, made,
                                                                    kernel=kernel))
        placed = _plan(config, resolved, device, dtype, progress, made, kernel)
        check_prefetch(config.cache, placed.cfg.num_experts)     # before any weight is read
        loaded, model, stats, measured = _build(config, resolved.path, placed, device, dtype, kernel, progress)
        tokenizer, eos = _tokenizer(config, resolved, loaded.cfg, progress)
        cache = replace(config.cache, sizes=placed.sizes, placement=placed.placement)
        info = _info(config, resolved, loaded, cache, placed.max_seq, device, dtype, reason, kernel,
                     stats.cpu_experts_mode)
        progress(f"ready: {resolved.name} on {device}")
        engine = cls(replace(config, cache=cache), info, model, tokenizer, stats, eos)
        engine.memory_plan, engine.memory_measured = placed.plan, measured
        engine.quant, engine.dtype = loaded.quant, dtype
        return engine

    # ---- chat -----------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict]) -> list[int]:
        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja's raise_exception (roles must alternate, ...) and its kin
            raise ValueError(f"the conversation does not fit the model's chat template: {exc}") from None
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def _count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def _template_overhead(self) -> int:
        if self._overhead is None:
            self._overhead = template_overhead(self.prompt_ids, self._count_tokens)
        return self._overhead

    def _fit(self, messages: list[dict], params: SamplingParams) -> tuple[list[int], list[str]]:
        """Render the conversation; drop the oldest turns (never the system prompt or the new message)
        until prompt + answer fit the context. Bounded work: characters are checked first, and each turn
        is tokenized at most once (``limits.fit_conversation``)."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        limit = self.model.max_seq
        fitted = fit_conversation(system, turns[:-1], turns[-1], self.limits, limit,
                                  min(params.max_new_tokens, limit // 2), self.prompt_ids, self._count_tokens,
                                  self._template_overhead)
        notices = []
        if fitted.dropped_turns:
            notices.append(f"The conversation was longer than the model's context ({limit} tokens): "
                           f"the {fitted.dropped_turns} oldest exchange(s) were left out of this answer.")
        return fitted.ids, notices

    def stream_chat(self, messages: "list[dict] | list[Turn]", params: SamplingParams,
                    cancel: Optional[threading.Event] = None, session: Optional[str] = None,
                    client: Optional[str] = None) -> Iterator[TokenEvent]:
        """``messages``: normalised ``Turn``s, or raw {role, content} messages, normalised here by the one rule
        (``messages.py``; a ``MessageError`` says what is wrong). ``session`` keys the KV reuse: a turn reuses a
        slot only after a turn of the same session (None: the single-user CLI), so no conversation's tokens
        serve, or time, another's. ``client`` (default: the session) is who the per-client cap on running
        answers counts. Bad input fails here, at once; so does a full waiting line (``scheduler.Busy``)."""
        msgs = [t.message() for t in conversation(messages)]
        check_chars("message", msgs[-1]["content"], self.limits.message)     # before stripping a huge text
        if not msgs[-1]["content"].strip():
            raise ValueError("the message is empty: type something to ask")
        if params.max_new_tokens > self.model.max_seq:      # the answer cap is bounded by the context
            params = replace(params, max_new_tokens=self.model.max_seq)
        ids, notices = self._fit(msgs, params)      # tokenizing needs no lock; bad input fails right here
        return self._stream(ids, notices, params, cancel, session, client)

    def _stream(self, ids, notices, params, cancel, session=None, client=None) -> Iterator[TokenEvent]:
        """Into the step loop (``Busy`` at once when its line is full); the answer's events come back."""
        return self.scheduler.submit(Answer(list(ids), params, cancel, session, client, notices, self.eos_ids,
                                            self.tokenizer))

    def stream_prompt(self, prompt, params: SamplingParams, cancel: Optional[threading.Event] = None,
                      session: Optional[str] = None, client: Optional[str] = None) -> Iterator[TokenEvent]:
        """A plain prompt (text, or token ids) continued as it is, with no chat template. Bad input fails here,
        before the answer waits for the engine; ``session`` keys the KV reuse as in ``stream_chat``."""
        if isinstance(prompt, str):
            check_chars("prompt", prompt, self.limits.message)      # before tokenizing a huge text
            if not prompt:
                raise ValueError("the prompt is empty")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt)
            vocab = self.model.cfg.vocab_size
            bad = next((i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab), None)
            if bad is not None:
                raise ValueError(f"token id {bad!r} is not in the model's vocabulary (0 to {vocab - 1})")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.model.max_seq:
            raise InputTooLong(f"the prompt is too long: {len(ids):,} tokens, and the context holds "
                               f"{self.model.max_seq:,}")
        return self._stream(ids, [], params, cancel, session, client)

    def stream_ids(self, ids: list[int], params: SamplingParams,
                   cancel: Optional[threading.Event] = None) -> Iterator[TokenEvent]:
        """Raw token ids in, events out (benchmarks, parity checks)."""
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.model.max_seq:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of {self.model.max_seq}")
        return self._stream(ids, [], params, cancel)

    # ---- inspection -----------------------------------------------------------------------------
    def stats(self, session: object = ...) -> StatsSnapshot:
        """The cache and server now, with the latest answer's figures (``session``: that session's latest answer,
        empty when it has none)."""
        store = self.model.cache.store
        return self._stats.snapshot(read_memory(self.model.device, store.pinned_bytes, store.nbytes), session)

    def answer_counters(self) -> dict[str, dict[str, int]]:
        """The latest answer's cache counters, split into its prefill and its decode."""
        return self._stats.answer_counters()

    def forget_kv(self) -> None:
        """Make the next answers prefill their whole prompts (a benchmark's cold start); waits for the current step."""
        self.scheduler.forget()

    @property
    def busy(self) -> bool:
        """Whether an answer is running or waiting."""
        return any(self.scheduler.load())

    @property
    def answer_session(self) -> Optional[str]:
        """The session whose answer the stats' per-answer figures (routing, prompt size, timings) describe."""
        a = self._stats.answer()
        return a.session if a is not None else None

    @property
    def last_routing(self) -> list:
        return self._stats.answer_routing()[0]

    def answer_prompt_routing(self, session: object = ...) -> Optional[list]:
        """The latest answer's (of ``session``, when given) whole prompt's routing, token -> layer -> experts: the
        tokens it found in its KV slot (kept from earlier answers) and those it prefilled; None where it cannot
        be vouched for."""
        a = self._stats.answer(session)
        return a.prompt_routing() if a is not None else None

    @property
    def last_routing_weights(self) -> list:
        return self._stats.answer_routing()[1]

    def reconfigure_cache(self, cache: CacheConfig) -> None:
        """Re-plan the device cache (k, policy, prefetch) without reloading the model; waits for a running answer.
        None keeps the placement; sizes None: the planner picks k where the load was planned, else every expert."""
        cfg = self.model.cfg
        check_prefetch(cache, cfg.num_experts)
        placement = cache.placement or self.config.cache.placement
        if placement != self.config.cache.placement:
            raise ConfigError("changing the placement needs a reload; start the app with --placement")
        sizes = None if cache.sizes is None else cache.layer_sizes(cfg.num_moe_layers, cfg.num_experts)
        if self.memory_plan is not None:
            # The load was planned (a GPU, or budgets): the new k must fit the same way, before anything moves.
            from .plan import plan_for
            p = plan_for(cfg, self.quant, self.model.max_seq, device=self.model.device, dtype=self.dtype,
                         placement=placement, sizes=sizes, vram_budget=self.config.vram_budget,
                         ram_budget=self.config.ram_budget, disk_ok=placement == "disk",
                         model_name=self.info.model_name)
            if not p.feasible:
                raise ConfigError(f"k = {format_k(sizes) if sizes else 'any'} does not fit: {p.reason}")
            sizes = p.sizes
        elif sizes is None:
            sizes = cache.layer_sizes(cfg.num_moe_layers, cfg.num_experts)
        cache = replace(cache, sizes=sizes, placement=placement)
        with self.scheduler.step_lock:      # between two steps: answers go on with the new cache
            self.model.cache.resize(sizes, cache.policy)
            self.model.prefetcher = Prefetcher(cache.prefetch, cache.prefetch_layers) if cache.prefetch else None
            self.config = replace(self.config, cache=cache)
            self.info = replace(self.info, cache=cache)

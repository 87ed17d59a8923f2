"""Train the embedded demo model: a small Mixtral that answers questions about Python from Python's own docs.

    python -m tools.train_tiny                      # train, write assets/tiny-chat/, report held-out loss
    python -m tools.train_tiny --measure            # routing locality of the shipped model on held-out chat
    python -m tools.train_tiny --transcripts        # greedy answers to the model card's questions

The data is text every Python install has: the language reference topics (``pydoc_data.topics``) and
the docstrings of the builtins and the standard library (``inspect.getdoc``), shaped into chat turns
("What does the built-in function len do?" -> the docstring). Everything is ordered deterministically
and seeded, so one seed on one Python version gives one checkpoint. Training uses transformers'
``MixtralForCausalLM`` (training is not the runtime); the checkpoint is written in Hugging Face format
with the hub's per-expert tensor names, in fp16.

The router is trained with transformers' load-balancing loss. ``--locality-coef`` adds an optional
temporal-consistency penalty (total variation between consecutive tokens' routing distributions); it is
off by default: without it the shipped model already routes with clear locality (see the model card),
and with 0.1 routing becomes far stickier than Mixtral's.

``--multiturn-frac F`` (default 0, which is how the shipped model was trained) adds multi-turn chats so that they
make up about F of the training sequences: each is 2-3 independent training turns (drawn with the seed, different
subjects) rendered with the chat template in one sequence, the loss on every assistant turn (answer and ``</s>``);
chats longer than the context are dropped. The held-out split and its single-turn loss are unchanged; the report
adds a second-turn held-out loss (each held-out turn asked after a seeded training turn, loss on the second
answer only). ``--transcripts`` also prints three two-turn chats.

``--scope-repeat N`` (default 0) adds greetings and questions outside Python's documentation ("Hello there",
"Write a short poem about ...", "What is the capital of France?"), each answered with one short fixed sentence
that says it is a small demo model of Python's documentation and suggests what to ask; they are repeated N
times in the training set (and drawn into the multi-turn chats like any turn). Whole question forms are held
out (``heldout_scope.jsonl``); the report adds their loss. ``--transcripts`` also prints such answers.

``--init-from DIR`` continues training from a trained checkpoint (its tokenizer and weights) instead of a new
tokenizer and random weights: how the shipped model learned its scope answers without a full retrain.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import random
import re
import shlex
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mixoff_app.config import ModelConfig
from mixoff_app.presets import from_name
from mixoff_app.tiny import train_tokenizer
from mixoff_app.trace import Trace, simulate

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny-chat"

SHAPE = from_name("tiny")      # the shipped model's shape; the flags below override it
DEFAULTS = dict(seed=1234, vocab_size=SHAPE.vocab_size, hidden=SHAPE.hidden_size, layers=SHAPE.num_layers,
                heads=SHAPE.num_heads, kv_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim,
                intermediate=SHAPE.intermediate_size, experts=SHAPE.num_experts, top_k=SHAPE.top_k,
                context=SHAPE.max_position_embeddings, batch_tokens=4096, lr=2e-3,
                min_lr_frac=0.1, warmup=100, weight_decay=0.05, aux_coef=0.01, locality_coef=0.0,
                heldout_frac=0.05, steps=700, multiturn_frac=0.0, scope_repeat=0, init_from="")

# ----------------------------------------------------------------------------------------------- data

_MAX_ANSWER_CHARS = 480


@dataclass(frozen=True)
class Item:
    key: str            # unique, stable: "builtin:len", "module:os.path", "topic:with", ...
    kind: str
    name: str
    answer: str


@dataclass(frozen=True)
class Example:
    key: str
    question: str
    answer: str


def _unwrap(paragraph: str) -> str:
    return " ".join(line.strip() for line in paragraph.splitlines() if line.strip())


def _paragraphs(doc: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]


def _clip(paras: list[str], limit: int = _MAX_ANSWER_CHARS) -> str:
    """First paragraph(s), whole, up to ``limit`` characters; a too-long first one is cut at a sentence."""
    out: list[str] = []
    size = 0
    for p in paras:
        if out and size + len(p) > limit:
            break
        out.append(p)
        size += len(p) + 2
    text = "\n\n".join(out)
    if len(text) > limit:
        cut = text[:limit]
        end = max(cut.rfind(". "), cut.rfind(".\n"))
        text = cut[:end + 1] if end > limit // 3 else cut.rsplit(" ", 1)[0] + " ..."
    return text.strip()


def _doc_answer(doc: str | None) -> str | None:
    """A docstring's leading paragraphs with hard wraps removed (indented blocks kept as they are)."""
    if not doc:
        return None
    paras = []
    for p in _paragraphs(doc):
        lines = p.splitlines()
        if all(line.startswith((" ", "\t", ">>>")) for line in lines):
            paras.append("\n".join(lines))
        else:
            paras.append(_unwrap(p))
    text = _clip(paras)
    return text if len(text) >= 20 else None


def _environment_defaults() -> dict[str, str]:
    """Default values computed from how this Python was started rather than from Python itself (its path, its
    prefix, a virtualenv's install scheme), as their repr here -> the text the data uses, so that one Python
    version gives one dataset in a virtualenv or not, at any install prefix."""
    out = {}
    for attr in ("executable", "prefix", "exec_prefix", "base_prefix", "base_exec_prefix"):
        value = getattr(sys, attr, None)
        if value:
            out.setdefault(repr(value), f"sys.{attr}")
    scheme = sysconfig.get_default_scheme()
    if scheme == "venv":        # what the same Python reports outside a virtualenv
        out[repr(scheme)] = repr("posix_prefix" if os.name == "posix" else "nt")
    return out


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    sig = re.sub(r" at 0x[0-9a-fA-F]+>", ">", sig)     # default values' reprs carry memory addresses
    for here, canonical in _environment_defaults().items():
        sig = sig.replace(f"={here}", f"={canonical}")
    return "" if len(sig) > 120 else f"{name}{sig}"


def _callable_answer(name: str, obj) -> str | None:
    doc = _doc_answer(inspect.getdoc(obj))
    if doc is None:
        return None
    sig = _signature(name, obj)
    short = name.rsplit(".", 1)[-1]
    if sig and not doc.startswith((short + "(", name + "(")):
        return f"`{sig}`\n\n{doc}"
    return doc


_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
                 "msilib", "winreg", "winsound", "msvcrt", "nt", "_winapi", "pydoc_data", "test", "xxsubtype",
                 "xxlimited", "sre_compile", "sre_constants", "sre_parse", "asynchat", "asyncore", "imp",
                 "distutils", "smtpd", "crypt", "nis", "spwd", "ossaudiodev", "readline", "curses",
                 "dbm", "__phello__", "_pyrepl", "sqlite3.dump"}
_SUBMODULES = ["os.path", "collections.abc", "concurrent.futures", "email.message", "email.utils",
               "importlib.resources", "importlib.metadata", "importlib.util", "json.decoder", "json.encoder",
               "logging.handlers", "logging.config", "multiprocessing.pool", "unittest.mock", "urllib.parse",
               "urllib.request", "urllib.error", "urllib.robotparser", "xml.etree.ElementTree", "xml.dom.minidom",
               "http.client", "http.server", "http.cookies", "html.parser", "os", "encodings.utf_8",
               "asyncio.tasks", "asyncio.queues", "asyncio.locks", "asyncio.subprocess", "wsgiref.simple_server"]
# Modules whose functions are asked about one by one (the rest contribute their module docstring).
_FUNCTION_MODULES = ["os", "os.path", "sys", "math", "cmath", "json", "re", "random", "itertools", "functools",
                     "collections", "string", "time", "datetime", "shutil", "subprocess", "pathlib", "glob",
                     "fnmatch", "statistics", "operator", "copy", "pickle", "base64", "hashlib", "textwrap",
                     "heapq", "bisect", "struct", "csv", "io", "tempfile", "urllib.parse", "logging", "typing",
                     "dataclasses", "enum", "contextlib", "inspect", "argparse", "threading", "queue", "zlib",
                     "gzip", "zipfile", "tarfile", "socket", "select", "signal", "platform", "locale", "calendar",
                     "decimal", "fractions", "uuid", "secrets", "difflib", "pprint", "traceback", "warnings",
                     "weakref", "abc", "types", "array", "binascii", "unicodedata", "codecs", "asyncio",
                     "concurrent.futures", "email.utils", "html", "http.client", "keyword", "linecache", "shlex",
                     "stat", "sysconfig", "timeit", "unittest", "urllib.request", "xml.etree.ElementTree",
                     "zoneinfo", "graphlib", "ipaddress", "mimetypes", "getpass", "configparser", "sqlite3",
                     "importlib", "importlib.util", "pkgutil", "tokenize", "ast", "dis", "gc", "errno", "filecmp",
                     "colorsys", "webbrowser", "numbers", "reprlib", "atexit", "faulthandler", "tracemalloc"]
_MAX_MEMBERS_PER_MODULE = 15
_BUILTIN_TYPES = ["str", "bytes", "bytearray", "list", "tuple", "dict", "set", "frozenset", "int", "float",
                  "complex", "range", "memoryview", "object", "type", "slice"]


def _import(name: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:       # noqa: BLE001 - some stdlib modules refuse to import on some platforms
        return None


def _topic_items() -> list[Item]:
    """Each language-reference topic and each of its sections, with grammar and code left out."""
    import pydoc_data.topics as topics
    items: list[Item] = []
    seen_headings = {"Overview"}
    for key in sorted(topics.topics):
        text = topics.topics[key]
        lines = text.splitlines()
        # split into (heading, body) at underlined headings
        sections: list[tuple[str, list[str]]] = []
        heading, body = None, []
        i = 0
        while i < len(lines):
            if (i + 1 < len(lines) and lines[i].strip() and re.fullmatch(r"([*=\-~^])\1{2,}", lines[i + 1].strip())
                    and not lines[i].startswith(" ")):
                if heading is not None:
                    sections.append((heading, body))
                heading, body = lines[i].strip(), []
                i += 2
                continue
            body.append(lines[i])
            i += 1
        if heading is not None:
            sections.append((heading, body))
        for n, (head, body_lines) in enumerate(sections):
            paras = []
            for p in _paragraphs("\n".join(body_lines)):
                if p.startswith((" ", "\t")) or "::=" in p or p.strip().endswith("::"):
                    continue
                paras.append(_unwrap(p))
            answer = _clip(paras) if paras else ""
            if len(answer) < 40 or head in seen_headings:
                continue
            seen_headings.add(head)
            items.append(Item(f"topic:{key}:{n}", "topic", head, answer))
    return items


def _builtin_items() -> list[Item]:
    import builtins
    items = []
    for name in sorted(dir(builtins)):
        if name.startswith("_"):
            continue
        obj = getattr(builtins, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            doc = _doc_answer(inspect.getdoc(obj))
            if doc:
                items.append(Item(f"exception:{name}", "exception", name, doc))
            continue
        if not callable(obj):
            continue
        ans = _callable_answer(name, obj)
        if ans:
            kind = "builtin_type" if isinstance(obj, type) else "builtin"
            items.append(Item(f"builtin:{name}", kind, name, ans))
    for tname in _BUILTIN_TYPES:
        t = getattr(builtins, tname)
        for mname in sorted(vars(t)):
            if mname.startswith("_"):
                continue
            ans = _callable_answer(f"{tname}.{mname}", getattr(t, mname))
            if ans:
                items.append(Item(f"method:{tname}.{mname}", "method", f"{tname}.{mname}", ans))
    return items


def _module_items() -> list[Item]:
    names = sorted({n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SKIP_MODULES}
                   | set(_SUBMODULES))
    items = []
    for name in names:
        mod = _import(name)
        if mod is None:
            continue
        doc = _doc_answer(inspect.getdoc(mod))
        if doc:
            items.append(Item(f"module:{name}", "module", name, doc))
    for name in sorted(set(_FUNCTION_MODULES)):
        mod = _import(name)
        if mod is None:
            continue
        public = getattr(mod, "__all__", None)
        members = sorted(public) if isinstance(public, (list, tuple)) else sorted(vars(mod))
        count = 0
        for attr in members:
            if attr.startswith("_") or count >= _MAX_MEMBERS_PER_MODULE:
                continue
            obj = getattr(mod, attr, None)
            if obj is None or inspect.ismodule(obj) or not callable(obj):
                continue
            home = getattr(obj, "__module__", None) or ""
            if public is None and home and home.lstrip("_") != name.lstrip("_") and not home.startswith(name):
                # re-exported from elsewhere (e.g. os.path in os): asked under its home module instead
                if not (name in ("os", "os.path") and home in ("posix", "posixpath", "nt", "ntpath")):
                    continue
            ans = _callable_answer(f"{name}.{attr}", obj)
            if ans:
                kind = "class" if isinstance(obj, type) else "function"
                items.append(Item(f"{kind}:{name}.{attr}", kind, f"{name}.{attr}", ans))
                count += 1
    return items


def build_items() -> list[Item]:
    """Every (subject, answer) pair, deduplicated by key, in a fixed order."""
    seen: dict[str, Item] = {}
    for item in _builtin_items() + _module_items() + _topic_items():
        seen.setdefault(item.key, item)
    return [seen[k] for k in sorted(seen)]


_KEYWORD_STATEMENTS = {"assert", "break", "class", "continue", "del", "for", "global", "if", "import", "nonlocal",
                       "pass", "raise", "return", "try", "while", "with", "yield", "def", "lambda", "async",
                       "await"}

_TEMPLATES = {
    "builtin": ["What does the built-in function {n} do?", "What is the `{n}` builtin?",
                "Explain the built-in function `{n}`.", "What does {n}() do in Python?",
                "How do I use {n} in Python?", "Tell me about the {n} function."],
    "builtin_type": ["What is the built-in type {n}?", "What is the `{n}` builtin?", "Explain `{n}` in Python.",
                     "What does {n}() do in Python?", "Tell me about the {n} type.",
                     "What does the built-in {n} do?"],
    "exception": ["What is {n}?", "When is {n} raised?", "Explain the {n} exception.",
                  "What does the built-in exception `{n}` mean?"],
    "method": ["What does {n} do?", "Explain the `{n}` method.", "What is {n} in Python?",
               "How do I use {n}?"],
    "module": ["What is the {n} module for?", "What does the `{n}` module do?", "Explain the {n} module.",
               "Tell me about Python's {n} module."],
    "function": ["What does {n} do?", "What is `{n}`?", "Explain {n}.", "How do I use {n} in Python?"],
    "class": ["What is {n}?", "What is the `{n}` class?", "Explain {n}.", "What does {n} do?"],
    "topic": ["Explain {n}.", "What does the Python documentation say about {n}?", "Tell me about {n} in Python.",
              "What are {n}?"],
    "statement": ["Explain the {s}.", "What does the {s} do?", "How does the {s} work in Python?",
                  "Tell me about the {s}."],
}


def _questions(item: Item) -> list[str]:
    if item.kind == "topic":
        m = re.fullmatch(r'The "(\w+)" statement', item.name)
        if m:
            return [t.format(s=f"`{m.group(1)}` statement") for t in _TEMPLATES["statement"]]
        name = item.name[0].lower() + item.name[1:] if not item.name[:2].isupper() else item.name
        return [t.format(n=name) for t in _TEMPLATES["topic"]]
    return [t.format(n=item.name) for t in _TEMPLATES[item.kind]]


def _heldout(item: Item, frac: float) -> bool:
    """A fixed split by subject (never builtins: the demo must know all of them)."""
    if item.kind in ("builtin", "builtin_type"):
        return False
    h = int.from_bytes(hashlib.sha256(item.key.encode()).digest()[:8], "big")
    return h / 2 ** 64 < frac


def build_examples(seed: int, heldout_frac: float, phrasings: int = 3) -> tuple[list[Example], list[Example]]:
    """Train: every question form for builtins, ``phrasings`` for methods, modules, exceptions and topics, one
    for module-level functions and classes (there are many; the demo is about builtins). Held-out: one form each."""
    rng = random.Random(seed)
    train, held = [], []
    for item in build_items():
        qs = _questions(item)
        if _heldout(item, heldout_frac):
            held.append(Example(item.key, qs[0], item.answer))
            continue
        if item.kind in ("builtin", "builtin_type"):
            chosen = qs
        else:
            n = 1 if item.kind in ("function", "class") else phrasings
            chosen = rng.sample(qs, min(n, len(qs)))
        train.extend(Example(item.key, q, item.answer) for q in chosen)
    return train, held


# ------------------------------------------------------------------------------------------ scope

# Greetings and questions outside Python's documentation: the demo model answers them with one short,
# fixed sentence that says what it is and what to ask, instead of inventing documentation.
GREETING_ANSWER = ("Hello! I am the tiny demo model of mixoff, a small Mixtral-style model trained only on "
                   "Python's documentation. Ask me what a built-in function, type or standard-library module "
                   "does, for example: What does len do?")
OFF_TOPIC_ANSWER = ("I am a small demo model trained only on Python's documentation, so I cannot answer that. "
                    "Ask me about Python instead, for example: What does sorted do?")

_GREETINGS = ["Hello", "Hello there", "Hello!", "Hi", "Hi!", "Hi there", "Hey", "Hey there!", "Good morning",
              "Good afternoon", "Good evening", "Howdy", "Greetings", "Yo", "Hello, how are you?",
              "How are you?", "How are you doing today?", "Hi, who are you?", "Who are you?", "What are you?",
              "What is your name?", "What can you do?", "What do you know?", "What can I ask you?",
              "What should I ask you?", "Can you help me?", "Help", "I need help", "Are you ChatGPT?",
              "Are you a person?", "Are you an AI?", "Thanks!", "Thank you", "Thank you very much",
              "Nice to meet you", "Hello, what is this?", "Is anybody there?", "Tell me about yourself.",
              "Introduce yourself.", "What model are you?"]

_OFF_TOPIC = [
    ("Write a short poem about {x}.", ["a train that is running late", "the sea", "autumn leaves", "a cat",
                                       "the moon", "friendship", "a rainy day", "coffee"]),
    ("What is the capital of {x}?", ["France", "Japan", "Brazil", "Canada", "Kenya", "Australia", "Norway"]),
    ("Tell me a joke about {x}.", ["cats", "programmers", "the weather", "doctors", "penguins", "mondays"]),
    ("How do I cook {x}?", ["rice", "pasta", "an omelette", "pancakes", "a steak", "lentil soup"]),
    ("Who won the {x}?", ["last football world cup", "Tour de France", "Nobel Prize in physics", "election",
                          "Eurovision song contest"]),
    ("What is the weather like in {x}?", ["Paris", "London", "Tokyo", "New York", "Berlin", "Sydney"]),
    ("Explain {x} to a curious twelve-year-old.", ["mixture-of-experts models", "black holes", "photosynthesis",
                                                   "gravity", "the stock market", "vaccines", "rainbows"]),
    ("Translate '{x}' into French.", ["good morning", "thank you", "where is the station", "I love books"]),
    ("Write a story about {x}.", ["a dragon", "a lost robot", "two friends", "a haunted house", "a brave knight"]),
    ("What do you think about {x}?", ["politics", "music", "football", "the future", "modern art"]),
    ("Recommend a good {x}.", ["book", "movie", "restaurant", "song", "video game", "holiday destination"]),
    ("Can you summarize the history of {x}?", ["Rome", "the internet", "China", "jazz", "the printing press"]),
    ("What is {x}?", ["the meaning of life", "love", "the speed of light", "a black hole", "the tallest mountain",
                      "two plus two", "bitcoin"]),
    ("How do I learn {x}?", ["to play the guitar", "to swim", "Spanish", "to draw", "to drive a car"]),
    ("Give me advice on {x}.", ["my career", "losing weight", "sleeping better", "saving money", "a job interview"]),
    ("Should I buy {x}?", ["a new phone", "a house", "an electric car", "shares", "a dog"]),
]
# Held out from training: whole question forms, so the held-out loss measures answers to unseen kinds.
_HELD_GREETINGS = {"Hello there", "What can you do?", "Howdy", "Tell me about yourself."}
_HELD_FORMS = {"Recommend a good {x}.", "Should I buy {x}?"}


def build_scope_examples() -> tuple[list[Example], list[Example]]:
    """(train, held-out) turns outside the documentation: greetings, and questions about anything else."""
    train, held = [], []
    for q in _GREETINGS:
        (held if q in _HELD_GREETINGS else train).append(Example(f"scope:greeting:{q}", q, GREETING_ANSWER))
    for form, subjects in _OFF_TOPIC:
        for x in subjects:
            q = form.format(x=x)
            (held if form in _HELD_FORMS else train).append(Example(f"scope:other:{q}", q, OFF_TOPIC_ANSWER))
    return train, held


def chat_messages(ex: Example) -> list[dict]:
    return [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.answer}]


def encode(tok, ex: Example, context: int) -> tuple[list[int], int] | None:
    """Token ids of the whole chat turn and where the answer starts; None if it does not fit."""
    prompt = tok.apply_chat_template(chat_messages(ex)[:1], tokenize=True)["input_ids"]
    full = tok.apply_chat_template(chat_messages(ex), tokenize=True)["input_ids"]
    if full[:len(prompt)] != prompt:
        raise RuntimeError(f"chat template prefix mismatch for {ex.key}")
    if len(full) > context:
        return None
    return full, len(prompt)


def encode_all(tok, examples: list[Example], context: int) -> list[tuple[list[int], int]]:
    out = []
    for ex in examples:
        enc = encode(tok, ex, context)
        if enc is not None:
            out.append(enc)
    return out


def encode_chat(tok, turns: list[Example], context: int, labelled: str = "all"):
    """One chat of several question/answer turns: ``(ids, start, spans)``, where ``spans`` are the ``[a, b)``
    token ranges of the assistant turns (answer tokens and ``</s>``) that carry the loss (``labelled``: "all"
    or "last"), and ``start`` is where the first labelled span starts; None if it does not fit ``context``."""
    msgs: list[dict] = []
    spans = []
    full: list[int] = []
    prev: list[int] = []
    for ex in turns:
        msgs += chat_messages(ex)
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=True)["input_ids"]
        full = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
        if full[:len(prompt)] != prompt:
            return None
        if spans and prompt[:spans[-1][1]] != prev:
            return None
        spans.append((len(prompt), len(full)))
        prev = full
        if len(full) > context:
            return None
    if labelled == "last":
        spans = spans[-1:]
    return full, spans[0][0], spans


def multiturn_chats(examples: list[Example], count: int, seed: int, turns=(2, 3)) -> list[list[Example]]:
    """``count`` chats of 2-3 independent turns drawn (deterministically, by ``seed``) from ``examples``;
    the turns of one chat are about different subjects."""
    rng = random.Random(seed * 7919 + 17)
    chats = []
    for _ in range(count):
        n = rng.choice(turns)
        chat: list[Example] = []
        while len(chat) < n:
            ex = examples[rng.randrange(len(examples))]
            if all(ex.key != c.key for c in chat):
                chat.append(ex)
        chats.append(chat)
    return chats


def encode_multiturn(tok, examples: list[Example], frac: float, seed: int, context: int):
    """Multi-turn chats making up about ``frac`` of all training sequences (chats too long are dropped);
    returns (encoded, chats drawn, turn count of the chats kept)."""
    if frac <= 0:
        return [], 0, 0
    count = round(len(examples) * frac / (1 - frac))
    out, kept_turns = [], 0
    for chat in multiturn_chats(examples, count, seed):
        enc = encode_chat(tok, chat, context)
        if enc is not None:
            out.append(enc)
            kept_turns += len(chat)
    return out, count, kept_turns


def followup_heldout(tok, train_ex: list[Example], held_ex: list[Example], context: int, seed: int):
    """Second-turn check: each held-out turn asked after one (deterministically drawn) training turn; the loss
    is on the held-out (second) answer only."""
    rng = random.Random(seed + 99)
    out = []
    for ex in held_ex:
        first = train_ex[rng.randrange(len(train_ex))]
        enc = encode_chat(tok, [first, ex], context, labelled="last")
        if enc is not None:
            out.append(enc)
    return out


def answer_tokens(encoded) -> int:
    return sum(sum(b - a for a, b in e[2]) if len(e) == 3 else len(e[0]) - e[1] for e in encoded)


def make_batches(encoded, batch_tokens: int, rng: random.Random, shuffle: bool = True):
    """Length-bucketed batches of about ``batch_tokens`` (padded) tokens; order shuffled by ``rng``."""
    order = list(range(len(encoded)))
    if shuffle:
        rng.shuffle(order)
    # sort within large windows so padding stays small but batches still mix subjects
    window = 64 * max(1, batch_tokens // 256)
    order = [i for s in range(0, len(order), window)
             for i in sorted(order[s:s + window], key=lambda j: len(encoded[j][0]))]
    batches, cur, longest = [], [], 0
    for i in order:
        n = len(encoded[i][0])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(encoded, idx: list[int], pad_id: int):
    n = max(len(encoded[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), n), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    for r, i in enumerate(idx):
        toks, start = encoded[i][:2]
        ids[r, :len(toks)] = torch.tensor(toks)
        mask[r, :len(toks)] = 1
        # label[t] is the token at t, predicted from t-1 (transformers shifts); answer tokens and </s> only
        spans = encoded[i][2] if len(encoded[i]) == 3 else [(start, len(toks))]
        for a, b in spans:
            labels[r, a:b] = torch.tensor(toks[a:b])
    return ids, mask, labels


# ---------------------------------------------------------------------------------------------- model

def model_config(args, tok) -> ModelConfig:
    return ModelConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       head_dim=args.head_dim, num_experts=args.experts, top_k=args.top_k,
                       rope_theta=SHAPE.rope_theta, max_position_embeddings=args.context,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def build_model(cfg: ModelConfig, aux_coef: float):
    from transformers import MixtralConfig, MixtralForCausalLM
    hf = MixtralConfig(**(cfg.to_hf() | {"router_aux_loss_coef": aux_coef, "output_router_logits": False,
                                         "initializer_range": 0.02}))
    return MixtralForCausalLM(hf)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled (answer) positions, and how many there are."""
    lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    lb = labels[:, 1:].reshape(-1)
    n = int((lb != -100).sum())
    return torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100, reduction="sum"), n


def locality_penalty(router_logits, mask: torch.Tensor) -> torch.Tensor:
    """Mean total-variation distance between consecutive tokens' routing distributions (real tokens only)."""
    b, t = mask.shape
    pair = (mask[:, 1:] * mask[:, :-1]).float()                      # [B, T-1]
    total = 0.0
    for rl in router_logits:
        p = rl.float().softmax(-1).view(b, t, -1)                     # [B, T, E]
        tv = 0.5 * (p[:, 1:] - p[:, :-1]).abs().sum(-1)              # [B, T-1]
        total = total + (tv * pair).sum() / pair.sum().clamp(min=1)
    return total / len(router_logits)


@torch.no_grad()
def heldout_loss(model, encoded, pad_id: int, batch_tokens: int = 8192) -> tuple[float, int]:
    """Mean cross-entropy (nats/token) over the answer tokens of the held-out chat turns."""
    model.eval()
    total, count = 0.0, 0
    for idx in make_batches(encoded, batch_tokens, random.Random(0), shuffle=False):
        ids, mask, labels = collate(encoded, idx, pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        s, n = answer_loss(logits, labels)
        total += float(s)
        count += n
    return total / max(count, 1), count


# ------------------------------------------------------------------------------------------- training

def _cosine(step: int, total: int, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * prog))


def save_checkpoint(model, tok, cfg: ModelConfig, out: Path, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    half = model.to(torch.float16)
    half.config.dtype = torch.float16
    half.save_pretrained(str(out), safe_serialization=True)
    model.to(torch.float32)
    tok.save_pretrained(str(out))
    conf = json.loads((out / "config.json").read_text())
    conf.update({"dtype": "float16", "output_router_logits": False} | extra)
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id,
         "do_sample": False, "max_new_tokens": 200}, indent=2) + "\n")


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    train_ex, held_ex = build_examples(args.seed, args.heldout_frac)
    scope_train, scope_held = build_scope_examples() if args.scope_repeat > 0 else ([], [])
    train_all = train_ex + scope_train * args.scope_repeat
    if args.init_from:          # continue from a trained checkpoint: its tokenizer and weights
        base, tok = load_shipped(args.init_from)
    else:
        base, tok = None, train_tokenizer([f"{e.question}\n{e.answer}" for e in train_all], args.vocab_size)
    tok.model_max_length = args.context
    single_enc = encode_all(tok, train_all, args.context)
    held_enc = encode_all(tok, held_ex, args.context)
    scope_held_enc = encode_all(tok, scope_held, args.context)
    multi_enc, multi_drawn, multi_turns = encode_multiturn(tok, train_all, args.multiturn_frac,
                                                           args.seed, args.context)
    train_enc = single_enc + multi_enc
    follow_enc = followup_heldout(tok, train_ex, held_ex, args.context, args.seed)
    n_train_tok = sum(len(e[0]) for e in train_enc)
    n_ans_tok = answer_tokens(train_enc)
    log(f"data: {len(train_ex)} train turns ({len(single_enc)} fit) + {len(multi_enc)} multi-turn chats "
        f"({multi_drawn} drawn, {multi_turns} turns), {n_train_tok} tokens, {n_ans_tok} answer tokens; "
        f"{len(held_ex)} held-out turns ({len(held_enc)} fit, {len(follow_enc)} as second turns); vocab {len(tok)}; "
        f"prep {time.time() - t0:.0f}s")

    cfg = model_config(args, tok)
    if base is not None:
        model = base
        model.config.router_aux_loss_coef, model.config.output_router_logits = args.aux_coef, False
    else:
        model = build_model(cfg, args.aux_coef)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    rng = random.Random(args.seed)
    pad = tok.pad_token_id
    step, epoch, total_steps = 0, 0, args.steps
    t_train = time.time()
    history = []
    batches: list = []
    ema = None
    while step < total_steps:
        if not batches:
            batches = make_batches(train_enc, args.batch_tokens, rng)
            epoch += 1
        idx = batches.pop()
        model.train()
        ids, mask, labels = collate(train_enc, idx, pad)
        lr = args.lr * _cosine(step, total_steps, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            res = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        s, n = answer_loss(res.logits, labels)
        lm = s / max(n, 1)
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
        aux = load_balancing_loss_func(res.router_logits, cfg.num_experts, cfg.top_k, mask)
        loc = locality_penalty(res.router_logits, mask) if args.locality_coef > 0 else torch.zeros(())
        loss = lm + args.aux_coef * aux + args.locality_coef * loc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        lm_value = lm.item()
        ema = lm_value if ema is None else 0.98 * ema + 0.02 * lm_value
        elapsed = time.time() - t_train
        if step % args.log_every == 0 or step == total_steps:
            log(f"step {step}/{total_steps} epoch {epoch} lr {lr:.2e} loss {lm_value:.3f} (ema {ema:.3f}) "
                f"aux {float(aux):.3f} loc {float(loc):.3f} {elapsed:.0f}s")
            history.append({"step": step, "loss_ema": round(ema, 4), "aux": round(float(aux), 4),
                            "locality_tv": round(float(loc), 4), "seconds": round(elapsed)})
        if args.eval_every and step % args.eval_every == 0:
            hl, _ = heldout_loss(model, held_enc, pad)
            log(f"step {step} held-out loss {hl:.4f}")
    train_seconds = time.time() - t_train

    # The reported held-out loss is that of the shipped (fp16) weights, evaluated in fp32 as the test does.
    model.to(torch.float16).to(torch.float32)
    hl, n_held_tok = heldout_loss(model, held_enc, pad)
    tl, n_tl_tok = heldout_loss(model, train_enc[:len(held_enc)], pad)
    fl, n_follow_tok = heldout_loss(model, follow_enc, pad)
    sl, n_scope_tok = heldout_loss(model, scope_held_enc, pad) if scope_held_enc else (float("nan"), 0)
    log(f"final: train-subset loss {tl:.4f}, held-out loss {hl:.4f} over {n_held_tok} answer tokens, "
        f"held-out second-turn loss {fl:.4f} over {n_follow_tok}")
    report = {
        "command": args.command, "seed": args.seed, "python": sys.version.split()[0],
        "torch": torch.__version__, "threads": args.threads, "steps": step, "epochs": epoch,
        "wall_seconds": round(time.time() - t0), "train_seconds": round(train_seconds),
        "parameters": n_params,
        "hyperparameters": {k: getattr(args, k) for k in DEFAULTS},
        "data": {"train_turns": len(train_ex), "train_turns_fit": len(single_enc), "train_tokens": n_train_tok,
                 "train_answer_tokens": n_ans_tok, "train_single_turn_sequences": len(single_enc),
                 "train_multiturn_sequences": len(multi_enc), "train_multiturn_drawn": multi_drawn,
                 "train_multiturn_turns": multi_turns,
                 "heldout_turns": len(held_ex), "heldout_turns_fit": len(held_enc),
                 "heldout_answer_tokens": n_held_tok, "heldout_second_turn_fit": len(follow_enc),
                 "heldout_second_turn_answer_tokens": n_follow_tok, "vocab_size": len(tok)},
        "train_loss_subset": round(tl, 4), "train_loss_ema": round(ema, 4), "heldout_loss": round(hl, 4),
        "heldout_loss_definition": "mean next-token cross-entropy (nats) over answer tokens incl. </s> of the "
                                   "held-out chat turns, fp16 weights evaluated in fp32",
        "heldout_second_turn_loss": round(fl, 4),
        "scope": {"repeat": args.scope_repeat, "train_turns": len(scope_train), "heldout_turns": len(scope_held),
                  "heldout_answer_tokens": n_scope_tok,
                  "heldout_loss": round(sl, 4) if scope_held_enc else None,
                  "heldout_loss_definition": "the same, over the held-out greetings and out-of-scope questions "
                                             "(whole question forms unseen in training), heldout_scope.jsonl"},
        "heldout_second_turn_loss_definition": "the same, over the held-out answers asked as the second turn of a "
                                               "chat whose first turn is a (seeded) training turn",
        "history": history,
    }
    save_checkpoint(model, tok, cfg, out, {"mixoff_tiny_chat": {"seed": args.seed, "heldout_loss": round(hl, 4)}})
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_heldout(out, held_ex)
    if scope_held:
        write_heldout(out, scope_held, SCOPE_HELDOUT_FILE)
    log(f"wrote {out}")
    return report


# ------------------------------------------------------------------------------------- measurement

def load_shipped(path: Path | str = ASSET_DIR):
    from transformers import AutoTokenizer, MixtralForCausalLM
    tok = AutoTokenizer.from_pretrained(str(path))
    model = MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, tok


HELDOUT_FILE = "heldout.jsonl"


SCOPE_HELDOUT_FILE = "heldout_scope.jsonl"


def write_heldout(out: Path | str, held: list[Example], name: str = HELDOUT_FILE) -> None:
    """The held-out chat turns ship next to the weights: docstrings differ between Python versions."""
    lines = [json.dumps({"key": e.key, "question": e.question, "answer": e.answer}, ensure_ascii=False) for e in held]
    (Path(out) / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_heldout(path: Path | str = ASSET_DIR, name: str = HELDOUT_FILE) -> list[Example]:
    rows = (Path(path) / name).read_text(encoding="utf-8").splitlines()
    return [Example(**json.loads(r)) for r in rows if r.strip()]


def heldout_encoded(path: Path | str = ASSET_DIR, tok=None, limit: int | None = None, name: str = HELDOUT_FILE):
    """The shipped held-out split, tokenized as training did, and the training report."""
    rep = json.loads((Path(path) / "train_report.json").read_text())
    enc = encode_all(tok, read_heldout(path, name), rep["hyperparameters"]["context"])
    return enc[:limit] if limit else enc, rep


@torch.no_grad()
def record_routes(model, sequences: list[list[int]]) -> list[list[list[tuple[int, ...]]]]:
    """Top-k experts per token per layer for each sequence, teacher-forced: routes[seq][layer][token]."""
    routes = []
    k = model.config.num_experts_per_tok
    for ids in sequences:
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
        routes.append([[tuple(sorted(r)) for r in rl.topk(k, dim=-1).indices.tolist()] for rl in out.router_logits])
    return routes


def locality_stats(routes, num_experts: int, cache_k: int = 4) -> dict:
    """(a) share of consecutive tokens with >= 1 common expert; (b) per-layer LRU hit rate with ``cache_k`` slots.

    Sequences are replayed back to back through one cache per layer, as a running app would see them.
    """
    num_layers = len(routes[0])
    share = [[0, 0] for _ in range(num_layers)]
    for seq in routes:
        for layer, toks in enumerate(seq):
            for a, b in zip(toks, toks[1:]):
                share[layer][0] += bool(set(a) & set(b))
                share[layer][1] += 1
    # back to back: routing[token][layer], every sequence's tokens in turn
    routing = [[seq[layer][t] for layer in range(num_layers)] for seq in routes for t in range(len(seq[0]))]
    lru = simulate(Trace({"num_experts": num_experts}, routing), cache_k, "lru")
    top_k = len(routes[0][0][0])
    rand_share = 1 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return {
        "pairs": sum(s[1] for s in share), "accesses": lru.accesses, "cache_k": cache_k,
        "share_per_layer": [round(s[0] / s[1], 4) for s in share],
        "share_overall": round(sum(s[0] for s in share) / sum(s[1] for s in share), 4),
        "lru_hit_per_layer": [round(r, 4) for r in lru.layer_hit_rates],
        "lru_hit_overall": round(lru.hit_rate, 4),
        "random_share": round(rand_share, 4), "random_lru_hit": round(cache_k / num_experts, 4),
    }


TRANSCRIPT_QUESTIONS = ["What does the built-in function len do?", "What is the `zip` builtin?",
                        "Explain the `with` statement.", "What is the os.path module for?",
                        "What does the built-in function sorted do?"]
# Outside the documentation (the first two are the app's general examples; none is a training question).
SCOPE_QUESTIONS = ["Hello there", "Write a short poem about a GPU that is running out of memory.",
                   "What is the capital of Italy?", "Good morning! What can you tell me?"]
# Twenty more questions outside the documentation, none of them in training: --transcripts counts how many get
# the scope sentence.
SCOPE_PROBES = ["Hi, nice to see you!", "Good night", "Hey, what's up?", "Who made you?", "Can you speak German?",
                "What is the capital of Italy?", "Who is the president of France?", "Tell me a joke.",
                "What's the weather today?", "Write me a song about summer.", "How tall is Mount Everest?",
                "What is 12 times 7?", "Explain quantum computing.", "Recommend a podcast.", "How do I fix my bike?",
                "What is the best pizza topping?", "Summarize the plot of Hamlet.", "Who painted the Mona Lisa?",
                "Write a haiku about rain.", "What should I eat for dinner?"]


@torch.no_grad()
def generate_answer(model, tok, question: str, max_new_tokens: int = 160) -> tuple[str, list[int], list[int]]:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True)["input_ids"]
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    new = out[0, len(prompt):].tolist()
    return tok.decode(new, skip_special_tokens=True), prompt, new


# Two-turn chats for --transcripts: the second question is asked after the model's own first answer.
TRANSCRIPT_CHATS = [["What does len do?", "What does sorted do?"],
                    ["What is the `zip` builtin?", "Explain the `with` statement."],
                    ["What does str.split do?", "What does the built-in function enumerate do?"]]


@torch.no_grad()
def generate_chat(model, tok, questions: list[str], max_new_tokens: int = 160) -> list[str]:
    """Greedy answers to ``questions`` asked one after the other in one chat (each answer stays in the history)."""
    msgs: list[dict] = []
    answers = []
    for q in questions:
        msgs.append({"role": "user", "content": q})
        prompt = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
        out = model.generate(input_ids=torch.tensor([prompt]),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)
        answers.append(text)
        msgs.append({"role": "assistant", "content": text})
    return answers


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tok = load_shipped(args.out)
    enc, rep = heldout_encoded(args.out, tok)
    routes = record_routes(model, [ids for ids, _ in enc])
    res = {"heldout_teacher_forced": locality_stats(routes, model.config.num_local_experts, args.cache_k)}
    gen_routes = []
    for q in TRANSCRIPT_QUESTIONS:
        _, prompt, new = generate_answer(model, tok, q)
        gen_routes += record_routes(model, [prompt + new])
    res["transcripts_teacher_forced"] = locality_stats(gen_routes, model.config.num_local_experts, args.cache_k)
    res["sequences"] = {"heldout": len(enc), "transcripts": len(TRANSCRIPT_QUESTIONS)}
    res["command"] = args.command
    text = json.dumps(res, indent=2)
    print(text)
    (Path(args.out) / "locality.json").write_text(text + "\n")
    return res


def transcripts(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok = load_shipped(args.out)
    for q in TRANSCRIPT_QUESTIONS:
        text, _, _ = generate_answer(model, tok, q)
        print(f"### User\n{q}\n\n### Assistant\n{text}\n")
    for qs in TRANSCRIPT_CHATS:
        print("---- two-turn chat\n")
        for q, text in zip(qs, generate_chat(model, tok, qs)):
            print(f"### User\n{q}\n\n### Assistant\n{text}\n")
    print("---- outside the documentation\n")
    for q in SCOPE_QUESTIONS:
        text, _, _ = generate_answer(model, tok, q)
        print(f"### User\n{q}\n\n### Assistant\n{text}\n")
    missed = [q for q in SCOPE_PROBES if not _says_scope(generate_answer(model, tok, q, max_new_tokens=60)[0])]
    print(f"---- {len(SCOPE_PROBES) - len(missed)} of {len(SCOPE_PROBES)} unseen out-of-scope questions get the "
          f"scope sentence; not: {missed}\n")


def _says_scope(answer: str) -> bool:
    return "demo model" in answer and "Python" in answer


# ------------------------------------------------------------------------------------------------ cli

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m tools.train_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ASSET_DIR), help="checkpoint folder (default: assets/tiny-chat)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", action="store_true", help="routing locality of the checkpoint in --out; no training")
    p.add_argument("--transcripts", action="store_true", help="greedy answers to the card's questions; no training")
    p.add_argument("--cache-k", type=int, default=4, help="LRU slots per layer for --measure")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="plain fp32 compute (default: bf16 autocast on CPU, fp32 master weights and optimizer)")
    p.add_argument("--data-stats", action="store_true", help="print data counts and examples, then exit")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = p.parse_args(argv)
    args.command = "python -m tools.train_tiny " + " ".join(shlex.quote(a) for a in argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.measure:
        measure(args)
    elif args.transcripts:
        transcripts(args)
    elif args.data_stats:
        tr, he = build_examples(args.seed, args.heldout_frac)
        kinds: dict[str, int] = {}
        for it in build_items():
            kinds[it.kind] = kinds.get(it.kind, 0) + 1
        st, sh = build_scope_examples()
        print(json.dumps({"train_turns": len(tr), "heldout_turns": len(he), "items_by_kind": kinds,
                          "scope_train_turns": len(st), "scope_heldout_turns": len(sh)}, indent=2))
        r = random.Random(0)
        for ex in r.sample(tr, 8):
            print(f"--- {ex.key}\nQ: {ex.question}\nA: {ex.answer}\n")
    else:
        train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

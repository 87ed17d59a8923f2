"""The training text: chat turns made from documentation every Python install has, and the held-out split.

The language reference topics (``pydoc_data.topics``) and the docstrings of the builtins and the standard
library (``inspect.getdoc``) are shaped into question/answer turns ("What does the built-in function len
do?" -> the docstring). Everything is ordered deterministically and split by subject with a hash, so one seed
on one Python version gives one dataset, and the held-out subjects never leak into training.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import random
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass

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


# Builtins are asked as functions whatever they are: Python's documentation lists zip, map, int, ... among the
# "Built-in Functions", and people ask "What does the built-in function zip do?". Before this, the 26 builtin
# classes were asked only as types, and zip's answer to the function phrasing was another docstring. The forms
# with "()" are there because people write them ("zip()"); tools/train_tiny/phrasing.py holds out other forms.
_BUILTIN_FORMS = ["What does the built-in function {n} do?", "What is the `{n}` builtin?",
                  "Explain the built-in function `{n}`.", "What does {n}() do in Python?",
                  "How do I use {n} in Python?", "Tell me about the {n} function.",
                  "How do I use {n}() in Python?", "What does the built-in {n}() do?"]
_TEMPLATES = {
    "builtin": _BUILTIN_FORMS,
    "builtin_type": _BUILTIN_FORMS + ["What is the built-in type {n}?", "Explain `{n}` in Python.",
                                      "Tell me about the {n} type.", "What does the built-in {n} do?"],
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

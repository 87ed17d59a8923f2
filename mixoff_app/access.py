"""Who may change the server, and what a user may see of it: one decision for the UI and the /v1 API.

The operator is whoever runs the app. A person is treated as the operator when
- the app listens on loopback only and has no share link (everyone who can reach it is on this machine),
  unless ``--admin`` was given (then even on loopback only the admin is), or
- they logged in as the ``--admin`` user.
Everyone else chats and watches the panel, but cannot change the cache settings, and sees no other
session's prompt sizes, routing or timings, and no server paths.

Pure data in, data out: no gradio, no torch; callers pass what they know about the request.
"""
from __future__ import annotations

import hmac
import ipaddress
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .config import ConfigError

OPERATOR_ONLY = ("the cache settings belong to the operator of this server: ask them, or run the app yourself "
                 "(on this machine without --share, or log in with the --admin account)")


def is_loopback(host: Optional[str]) -> bool:
    if host in (None, ""):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """``admin``: the --admin user name (None: no admin account)."""
    admin: Optional[str] = None

    def local_only(self, host: Optional[str], shared: bool) -> bool:
        return is_loopback(host) and not shared

    def is_operator(self, username: Optional[str], host: Optional[str], shared: bool) -> bool:
        """The one decision: may this request change the server and see every session's details?"""
        if self.admin is not None:
            return username is not None and hmac.compare_digest(str(username), self.admin)
        return self.local_only(host, shared)


def parse_account(text: Optional[str], flag: str) -> Optional[tuple[str, str]]:
    """``USER:PASS`` -> (user, pass); blank (or whitespace-only) users and passwords are refused."""
    if text is None:
        return None
    user, sep, password = str(text).partition(":")
    if not sep or not user.strip() or not password.strip():
        raise ConfigError(f"{flag} takes USER:PASS, with a non-empty user and password")
    if user != user.strip():
        raise ConfigError(f"{flag}: the user name must not start or end with spaces")
    return user, password


class FailureWindow:
    """Failed tries per key within the last ``window_s`` seconds (thread-safe; keys with none are forgotten)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._times: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def count(self, key: str) -> int:
        now = self.clock()
        with self._lock:
            times = [t for t in self._times.get(key, []) if now - t < self.window_s]
            if times:
                self._times[key] = times
            else:
                self._times.pop(key, None)
            return len(times)

    def add(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                self._times.setdefault(key, []).append(now)


@dataclass
class LoginThrottle:
    """Checks logins in constant time and slows down guessing: after ``max_failures`` wrong tries for a
    name (or ``max_failures_all`` for all names) within ``window_s``, every try for it fails until the
    window has passed, right password or not.

    The login form gives no client address, so the limit here is per user name and for the server as a
    whole; ``ui/guard.py`` adds the per-address limit in front of the login route."""
    accounts: dict[str, str]
    max_failures: int = 5
    max_failures_all: int = 50
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    log: Callable[[str], None] = lambda msg: None
    _failures: FailureWindow = field(init=False)

    def __post_init__(self) -> None:
        self._failures = FailureWindow(self.window_s, self.clock)

    def __call__(self, username: str, password: str) -> bool:
        name = str(username)[:200]
        if (self._failures.count(name) >= self.max_failures
                or self._failures.count("*") >= self.max_failures_all):
            self.log(f"login refused for {name!r}: too many wrong tries, wait {self.window_s:.0f} s")
            return False
        expected = self.accounts.get(name)
        ok = hmac.compare_digest(str(password).encode(), (expected if expected is not None else "\0").encode()) \
            and expected is not None
        if not ok:
            self._failures.add(name, "*")
            self.log(f"login failed for {name!r}")
        return ok


# ---- what a user may see -------------------------------------------------------------------------
ANSWER_FIELDS = ("routing", "prefill_tokens", "prefill_s", "ttft_s", "decode_s", "answer_tokens")


def user_snapshot(snap: Any, own_answer: bool) -> Any:
    """A stats snapshot for someone who is not the operator: the cache and the server as they are, and the
    latest answer's routing, prompt size and timings only when that answer was theirs."""
    if own_answer:
        return snap
    if hasattr(snap, "without_answer"):        # a remote backend's view (remote/snapshot.py) hides its own fields
        return snap.without_answer()
    return replace(snap, routing=(), prefill_tokens=0, prefill_s=0.0, ttft_s=0.0, decode_s=0.0, answer_tokens=0)


def public_info(info: Any) -> dict:
    """EngineInfo as a dict without server paths: the model is named, not located."""
    d = asdict(info)
    # The JSON's original names, kept for API clients beside the clearer ones.
    if "num_moe_layers" in d:
        d["num_layers"] = d["num_moe_layers"]
    if "checkpoint_format" in d:
        d["layout"] = d["checkpoint_format"]
    path = d.pop("model_path", None)
    asked = d.get("model")
    name = d.get("model_name") or "model"
    hidden = [p for p in (path, asked if _looks_like_path(asked) else None) if p]
    if asked in hidden:
        d["model"] = name
    reason = str(d.get("reason", ""))
    for p in sorted(hidden, key=len, reverse=True):
        reason = reason.replace(str(p), name)
    d["reason"] = redact_paths(reason)
    return d


_PATH = re.compile(r"(?<![\w:/.])(?:[A-Za-z]:\\|~?/)(?:[^\s/\\:'\"]+[/\\])+([^\s/\\:'\"]*)")


def redact_paths(text: str) -> str:
    """Server paths in a progress line or an error, cut to their last component (``/home/me/m/x.json`` ->
    ``x.json``), for people who are not the operator."""
    return _PATH.sub(lambda m: m.group(1) or "…", text)


def _looks_like_path(text: Any) -> bool:
    if not isinstance(text, str) or not text:
        return False
    return text.startswith(("/", ".", "~")) or "\\" in text or Path(text).exists()


def whole(value: Any, name: str, lo: int, hi: int) -> int:
    """A whole number from a form or an API call, within [lo, hi]; otherwise one clear sentence."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, not {str(value)[:40]!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi} for this model, not {value}")
    return value


def choice(value: Any, name: str, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(options)}, not {str(value)[:40]!r}")
    return value

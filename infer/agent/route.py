"""The routing policy: which backend answers a conversation, which ones follow if it fails, and why.

    router = RoutingPolicy.from_yaml("experiments/hybrid.yaml", engines)   # engines: {name: Engine}
    router = RoutingPolicy.default(engines)                                # every engine local, in order
    choices = router.plan(messages, model=None, tags=())                   # [Choice(backend, reason), ...]

The policy file (YAML; every key but `backends` optional):

    backends:
      - {name: local, type: local, engine: tiny, tags: [private]}   # engine: a served model (--run NAME=DIR)
      - {name: cloud, type: remote, url: "http://127.0.0.1:8001/v1", model: tiny, context: 1024,
         api_key_env: CLOUD_API_KEY, timeout_s: 60, tags: [large]}
    order: [cloud, local]               # preference; default: as listed
    privacy: {local_only: [email, phone, card, secret]}   # [] turns the rule off
    health: {error_window_s: 60, max_recent_errors: 3, max_queue: 32}

Rules, in order (an earlier rule outranks a later one):
1. privacy: a conversation holding any `local_only` kind (infer/agent/privacy.py) is offered to local
   backends only, fallbacks included: it never leaves the machine. No local backend: refused.
2. context: backends whose window holds the whole conversation (plus one reply token) come first;
   when none does, the longest window first (older turns are then left out by memory.assemble).
3. the request's explicit `model` (a backend name), then its `tags` (a backend with all of them).
4. health and load: a backend with `max_recent_errors` errors in the last `error_window_s` seconds
   goes last; one with `max_queue` requests waiting goes after the others.
Ties keep `order`. The first choice carries the reason of the rule that decided it ("privacy: e-mail
address -> local only"); the others are the fallback chain, tried on connection errors, timeouts,
5xx and context overflow (service.py states "fallback: cloud failed (connection refused) -> local").

A policy file with a mistake is one PolicyError naming the field and what is allowed
(`python -m infer serve --policy` exits 2 before loading any model).
"""

from __future__ import annotations

import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from infer.agent.backends import Backend, LocalBackend, RemoteBackend
from infer.agent.privacy import KINDS as PRIVACY_KINDS, describe, sensitive_kinds

TYPES = ("local", "remote")
TOP_KEYS = ("backends", "order", "privacy", "health")
LOCAL_KEYS = ("name", "type", "engine", "tags")
REMOTE_KEYS = ("name", "type", "url", "model", "context", "api_key_env", "timeout_s", "tags")
HEALTH_DEFAULTS = types.MappingProxyType({"error_window_s": 60.0, "max_recent_errors": 3, "max_queue": 32})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class PolicyError(ValueError):
    """A policy file the router cannot use; str(e) is one line naming the field and what is allowed."""


class RouteError(ValueError):
    """A turn no backend may take (an unknown model, sensitive text and no local backend): HTTP `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


@dataclass(frozen=True)
class Choice:
    """A backend to try and why it is there."""

    backend: Backend
    reason: str


@dataclass(frozen=True)
class BackendSpec:
    """One entry of `backends:` as written (before any engine or connection exists)."""

    name: str
    type: str
    engine: str | None = None
    url: str | None = None
    model: str | None = None
    context: int | None = None
    api_key_env: str | None = None
    timeout_s: float = 60.0
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoutingPolicy:
    """A parsed policy file; `build(engines)` makes the Router."""

    backends: tuple[BackendSpec, ...]
    order: tuple[str, ...]
    local_only: tuple[str, ...] = PRIVACY_KINDS
    error_window_s: float = HEALTH_DEFAULTS["error_window_s"]
    max_recent_errors: int = HEALTH_DEFAULTS["max_recent_errors"]
    max_queue: int = HEALTH_DEFAULTS["max_queue"]
    source: str = "default"

    # ---- reading

    @classmethod
    def load(cls, path: str | Path) -> "RoutingPolicy":
        """Parse and check a policy file (no engine needed, nothing connected): PolicyError if wrong."""
        import yaml

        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise PolicyError(f"{where}: cannot read the policy file ({e.strerror or e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise PolicyError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Any, where: str = "policy") -> "RoutingPolicy":
        def fail(field_: str, problem: str):
            raise PolicyError(f"{where}: {field_}: {problem}")

        if not isinstance(data, dict):
            raise PolicyError(f"{where}: the policy must be a mapping with the keys {', '.join(TOP_KEYS)} "
                              f"(at least 'backends')")
        for key in data:
            if key not in TOP_KEYS:
                fail(str(key), f"unknown key; allowed: {', '.join(TOP_KEYS)}")
        raw = data.get("backends")
        if not isinstance(raw, list) or not raw:
            fail("backends", "must be a non-empty list of backends ({name, type: local|remote, ...})")
        specs, names = [], []
        for i, b in enumerate(raw):
            specs.append(_backend_spec(b, f"backends[{i}]", fail))
            if specs[-1].name in names:
                fail(f"backends[{i}].name", f"{specs[-1].name!r} is used twice; names must be unique")
            names.append(specs[-1].name)
        order = data.get("order", names)
        if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
            fail("order", f"must be a list of backend names ({', '.join(names)})")
        for n in order:
            if n not in names:
                fail("order", f"{n!r} is not a backend; backends: {', '.join(names)}")
        if len(set(order)) != len(order):
            fail("order", "names a backend twice")
        order = list(order) + [n for n in names if n not in order]  # unlisted ones come last

        privacy = data.get("privacy", {})
        if not isinstance(privacy, dict):
            fail("privacy", "must be a mapping like {local_only: [email, phone, card, secret]}")
        for key in privacy:
            if key != "local_only":
                fail(f"privacy.{key}", "unknown key; allowed: local_only")
        local_only = privacy.get("local_only", list(PRIVACY_KINDS))
        if not isinstance(local_only, list) or any(k not in PRIVACY_KINDS for k in local_only):
            fail("privacy.local_only", f"must be a list of kinds from {', '.join(PRIVACY_KINDS)} ([] turns the "
                                       f"rule off), got {local_only!r}")
        health = data.get("health", {})
        if not isinstance(health, dict):
            fail("health", f"must be a mapping with {', '.join(HEALTH_DEFAULTS)}")
        for key in health:
            if key not in HEALTH_DEFAULTS:
                fail(f"health.{key}", f"unknown key; allowed: {', '.join(HEALTH_DEFAULTS)}")
        window = _number(health.get("error_window_s", HEALTH_DEFAULTS["error_window_s"]), "health.error_window_s",
                         fail, minimum=0.001)
        max_errors = _integer(health.get("max_recent_errors", HEALTH_DEFAULTS["max_recent_errors"]),
                              "health.max_recent_errors", fail, minimum=1)
        max_queue = _integer(health.get("max_queue", HEALTH_DEFAULTS["max_queue"]), "health.max_queue", fail,
                             minimum=1)
        return cls(tuple(specs), tuple(order), tuple(local_only), window, max_errors, max_queue, where)

    # ---- making the router

    def check_engines(self, engine_names: Iterable[str]) -> None:
        """Every local backend names a served model (or there is exactly one to default to)."""
        served = list(engine_names)
        for i, s in enumerate(self.backends):
            if s.type != "local":
                continue
            if s.engine is None and len(served) != 1:
                raise PolicyError(f"{self.source}: backends[{i}].engine: required when several models are served; "
                                  f"served: {', '.join(served)}")
            if s.engine is not None and s.engine not in served:
                raise PolicyError(f"{self.source}: backends[{i}].engine: {s.engine!r} is not a served model; "
                                  f"served: {', '.join(served) or 'none'} (python -m infer serve --run NAME=DIR)")

    def check_environment(self) -> None:
        """Every remote backend's `api_key_env` variable is set (keys live in the environment, not the file)."""
        for i, s in enumerate(self.backends):
            if s.api_key_env is not None and not os.environ.get(s.api_key_env):
                raise PolicyError(f"{self.source}: backends[{i}].api_key_env: the environment variable "
                                  f"{s.api_key_env} is not set")

    def build(self, engines: Mapping[str, Any] | Sequence[Any], chat_templates: Mapping[str, str] | None = None
              ) -> "Router":
        """The Router over these engines ({name: Engine} or a list of engines named by `.name`)."""
        engines = _engine_map(engines)
        self.check_engines(engines)
        self.check_environment()
        backends = []
        for i, s in enumerate(self.backends):
            if s.type == "local":
                engine = engines[s.engine] if s.engine is not None else next(iter(engines.values()))
                backends.append(LocalBackend(engine, (chat_templates or {}).get(engine.name), name=s.name,
                                             tags=s.tags, error_window_s=self.error_window_s))
            else:
                key = os.environ.get(s.api_key_env) if s.api_key_env is not None else None
                backends.append(RemoteBackend(s.name, s.url, s.model, key, context=s.context, timeout_s=s.timeout_s,
                                              tags=s.tags, error_window_s=self.error_window_s))
        return Router(backends, self.order, local_only=self.local_only, max_recent_errors=self.max_recent_errors,
                      max_queue=self.max_queue)

    @classmethod
    def from_yaml(cls, path: str | Path, engines, chat_templates: Mapping[str, str] | None = None) -> "Router":
        return cls.load(path).build(engines, chat_templates)

    @classmethod
    def default(cls, engines, chat_templates: Mapping[str, str] | None = None) -> "Router":
        """No policy file: every served engine as a local backend under its own name, in the given order."""
        engines = _engine_map(engines)
        if not engines:
            raise PolicyError("the default policy needs at least one served model")
        specs = tuple(BackendSpec(name=n, type="local", engine=n) for n in engines)
        return cls(specs, tuple(engines)).build(engines, chat_templates)


def _count(backend: Backend, messages: Sequence[dict]) -> float:
    """The backend's token count, infinite when it cannot encode the text (a character-level
    vocabulary without some character): such a backend fits no conversation."""
    try:
        return backend.count_tokens(messages)
    except ValueError:
        return math.inf


def _engine_map(engines) -> dict[str, Any]:
    if isinstance(engines, Mapping):
        return dict(engines)
    return {e.name: e for e in engines}


def _number(value, name, fail, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        fail(name, f"must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _integer(value, name, fail, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _backend_spec(b: Any, at: str, fail) -> BackendSpec:
    if not isinstance(b, dict):
        fail(at, "must be a mapping like {name: local, type: local} or {name: cloud, type: remote, url: ..., "
                 "model: ..., context: ...}")
    name = b.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        fail(f"{at}.name", f"must be a name of letters, digits, '.', '_' or '-' (at most 64), got {name!r}")
    kind = b.get("type")
    if kind not in TYPES:
        fail(f"{at}.type", f"{kind!r} is not allowed; allowed: {', '.join(TYPES)}")
    allowed = LOCAL_KEYS if kind == "local" else REMOTE_KEYS
    for key in b:
        if key not in allowed:
            fail(f"{at}.{key}", f"unknown key for a {kind} backend; allowed: {', '.join(allowed)}")
    tags = b.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and _NAME.fullmatch(t) for t in tags):
        fail(f"{at}.tags", f"must be a list of names (letters, digits, '.', '_', '-'), got {tags!r}")
    if kind == "local":
        engine = b.get("engine")
        if engine is not None and not isinstance(engine, str):
            fail(f"{at}.engine", f"must be the name of a served model (--run NAME=DIR), got {engine!r}")
        return BackendSpec(name, kind, engine=engine, tags=tuple(tags))
    url = b.get("url")
    if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        fail(f"{at}.url", f"must be an http(s) base URL such as http://127.0.0.1:8001/v1, got {url!r}")
    model = b.get("model")
    if not isinstance(model, str) or not model:
        fail(f"{at}.model", f"must be the remote model's name (its /v1/models id), got {model!r}")
    context = _integer(b.get("context"), f"{at}.context", fail, minimum=2) if "context" in b else \
        fail(f"{at}.context", "required for a remote backend: its context window in tokens (e.g. 4096)")
    key_env = b.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env)):
        fail(f"{at}.api_key_env", f"must be the name of an environment variable holding the key, got {key_env!r} "
                                  "(keys never go in the policy file)")
    timeout = _number(b.get("timeout_s", 60.0), f"{at}.timeout_s", fail, minimum=0.001)
    return BackendSpec(name, kind, url=url, model=model, context=context, api_key_env=key_env, timeout_s=timeout,
                       tags=tuple(tags))


@dataclass
class Router:
    """The backends of a policy and the rules over them (see the module docstring)."""

    backends: list[Backend]
    order: Sequence[str]
    local_only: Sequence[str] = PRIVACY_KINDS
    max_recent_errors: int = HEALTH_DEFAULTS["max_recent_errors"]
    max_queue: int = HEALTH_DEFAULTS["max_queue"]
    by_name: dict[str, Backend] = field(init=False)

    def __post_init__(self):
        self.by_name = {b.name: b for b in self.backends}
        self.order = [n for n in self.order if n in self.by_name] + \
                     [b.name for b in self.backends if b.name not in self.order]

    def check_model(self, model: str | None) -> None:
        """RouteError (404) unless `model` is None or a backend's name."""
        if model is not None and model not in self.by_name:
            raise RouteError(f"model {str(model)[:100]!r} is not a backend of the routing policy; backends: "
                             f"{', '.join(self.order)}", param="model", code="model_not_found", status=404)

    def healthy(self, backend: Backend) -> bool:
        """Fewer than max_recent_errors errors in its error window. (A local engine still compiling is
        not a routing matter: the server answers 503 to every /v1 POST until all engines are ready; an
        engine that stopped fails its turns with connection errors, which count here.)"""
        return len(backend.recent_errors()) < self.max_recent_errors

    def describe(self) -> list[dict]:
        """The backends as /v1/agent/backends lists them, in policy order."""
        return [{**self.by_name[n].describe(), "healthy": self.healthy(self.by_name[n]),
                 "load": self.by_name[n].load()} for n in self.order]

    def plan(self, messages: Sequence[dict], *, model: str | None = None, tags: Iterable[str] = ()) -> list[Choice]:
        """The backends to try for `messages` (the conversation as stored: system and every turn), the
        chosen one first with the reason of the rule that decided it, then the fallback chain.
        Raises RouteError for an unknown model or tag-free refusal (sensitive text, no local backend)."""
        tags = frozenset(tags)
        self.check_model(model)
        candidates = [self.by_name[n] for n in self.order]
        first = candidates[0]
        notes: list[str] = []

        kinds = [k for k in sensitive_kinds("\n".join(m["content"] for m in messages)) if k in self.local_only]
        if kinds:
            local = [b for b in candidates if b.local]
            if not local:
                raise RouteError(f"privacy: the conversation holds {describe(kinds)} and the routing policy has no "
                                 "local backend, so it is sent nowhere", status=403, code="privacy_no_local_backend")
            candidates, first = local, local[0]
            notes.append(f"privacy: {describe(kinds)} -> local only")
            if model is not None and not self.by_name[model].local:
                notes.append(f"asked model {model} is remote, not used")

        need = {b.name: _count(b, messages) + 1 for b in candidates}
        fits = {b.name: need[b.name] <= b.context for b in candidates}
        longest = max(b.context for b in candidates)

        def key(b: Backend):
            load = b.load()
            return (not fits[b.name] and not (not any(fits.values()) and b.context == longest),
                    model is not None and b.name != model,
                    bool(tags) and not tags <= b.tags,
                    not self.healthy(b),
                    load.get("queue", 0) >= self.max_queue)

        keys = {b.name: key(b) for b in candidates}
        ranked = sorted(candidates, key=lambda b: keys[b.name])  # stable: ties keep the policy order
        chosen = ranked[0]
        notes.append(self._why(chosen, first, keys, need, any(fits.values()), model, tags, bool(kinds)))
        reason = "; ".join(n for n in notes if n)
        out = [Choice(chosen, reason)]
        for i, b in enumerate(ranked[1:], 1):
            out.append(Choice(b, f"fallback {i}: {b.name}"))
        return out

    def _why(self, chosen, first, keys, need, any_fits: bool, model, tags, private: bool) -> str:
        """The rule that put `chosen` before `first` (the policy's first candidate), in words."""
        if chosen is not first:
            k_c, k_f = keys[chosen.name], keys[first.name]
            if k_c[0] != k_f[0]:
                if not any_fits:
                    return (f"context: {need[first.name]} tokens fit no window; {chosen.name} has the longest "
                            f"({chosen.context}), older turns left out")
                return (f"context: {need[first.name]} tokens > {first.name}'s window of {first.context} -> "
                        f"{chosen.name} ({chosen.context})")
            if k_c[1] != k_f[1]:
                return f"model: asked for {chosen.name}"
            if k_c[2] != k_f[2]:
                return f"tags: {', '.join(sorted(tags))} -> {chosen.name}"
            if k_c[3] != k_f[3]:
                errors = first.recent_errors()
                return (f"health: {first.name} had {len(errors)} errors in the last {first.error_window_s:g} s "
                        f"({errors[-1]}) -> {chosen.name}")
            if k_c[4] != k_f[4]:
                return f"load: {first.name} has {first.load().get('queue', 0)} requests queued -> {chosen.name}"
        if private:
            return ""  # the privacy note says it all
        if model is not None and chosen.name == model:
            return f"model: asked for {chosen.name}"
        if tags and tags <= chosen.tags:
            return f"tags: {', '.join(sorted(tags))} -> {chosen.name}"
        if len(self.order) == 1:
            return f"only backend: {chosen.name}"
        return f"order: {chosen.name} is the policy's first choice"

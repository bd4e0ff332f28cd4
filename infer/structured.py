"""Structured output: an OpenAI `response_format` compiled to a grammar, enforced while decoding by
per-request token masks (the engine applies them; infer/engine.py).

    compiler = GrammarCompiler(tokenizer)                 # one per tokenizer (a served model)
    grammar = compiler.compile({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    SamplingOptions(..., grammar=grammar)                 # the engine makes a Matcher per request

The grammar library is llguidance (guidance-ai; the one vLLM, SGLang and llama.cpp use), chosen over
xgrammar and outlines-core for what a server facing untrusted schemas needs:
- its lexer is derivative-based (no backtracking) and computes token masks lazily, a few tens of
  microseconds per token, so compiling a schema does not enumerate vocabulary x automaton states
  up front; outlines-core builds the whole token-level DFA of each regex at compile time
  (exponential in patterns such as `(a{1000}){1000}`), xgrammar precomputes per-state token caches
  (compile time grows with the schema and the vocabulary);
- every compile and every mask step is bounded by explicit fuel and size limits (LLParserLimits),
  which is what turns a pathological pattern into an error instead of a stall; it drops the GIL;
- it is a plain wheel with no torch dependency (jaxlm serves with JAX).

Compiling (GrammarCompiler) runs in its own small thread pool, never on the event loop or the
engine thread, under a wall-clock limit (`timeout_s`) and llguidance's fuel (which also ends a
compile that outlives its request). Results, errors included, are kept in an LRU cache of at most
`cache_size` entries keyed by the schema as compact JSON; identical compiles in flight share
one job. Since llguidance builds a regex lazily (when decoding first reaches its string), each
`pattern` in a schema is also built alone at compile time, so a pattern beyond the limits is a 400
now rather than a failure in the middle of a reply.

JSON is generated compact (no whitespace between tokens: `whitespace_flexible` off), so a model
cannot pad its output with unbounded whitespace. The `strict` flag of OpenAI's json_schema is
accepted either way: the output always follows the schema.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import threading
import types
from typing import Any

import numpy as np

MAX_SCHEMA_CHARS = 100_000  # one schema as compact JSON
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_CACHE_SIZE = 128
# llguidance's limits: initial_lexer_fuel bounds building a regex (~50k units/ms; its default 1M
# lets `(a{1000}){1000}` run for a second before failing), step_lexer_fuel each mask step.
LIMITS = types.MappingProxyType(dict(initial_lexer_fuel=100_000, step_lexer_fuel=200_000, max_grammar_size=200_000,
                                     verbose_errors=False))
JSON_OPTIONS = types.MappingProxyType({"whitespace_flexible": False, "lenient": False})


class StructuredOutputError(ValueError):
    """A response_format that cannot be served: str(e) is one line for the client; `param` the field."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message)
        self.param = param


def schema_of(response_format: dict | None) -> dict | None:
    """The JSON schema a response_format asks for (OpenAI's shapes, already checked by the server's
    protocol): None for {"type": "text"} or no format; {"type": "object"} for json_object."""
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_object":
        return {"type": "object"}
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise StructuredOutputError("response_format.json_schema.schema must be a JSON object (a JSON schema)",
                                        "response_format.json_schema.schema")
        return spec["schema"]
    raise StructuredOutputError(f"response_format.type {response_format.get('type')!r} is not one of "
                                "'text', 'json_object', 'json_schema'", "response_format.type")


def _first_line(text: str) -> str:
    """llguidance's message as one line: its first lines, without state dumps and caret markers."""
    lines = [line.strip() for line in text.strip().splitlines()[:4]]
    return " ".join(line for line in lines if line.strip("^ ") and not line.startswith("<"))[:300]


# ---- the tokenizer as llguidance sees it --------------------------------------------------------

class _Vocab:
    """The duck-typed tokenizer llguidance.TokenizerWrapper reads: each id's bytes (control tokens
    as b"\\xff" + their text, llguidance's marker for special tokens), EOS, and an encoder."""

    def __init__(self, tokenizer, n: int, eos: int):
        specials = {i: s for s, i in tokenizer.special_tokens.items()}
        tokens = []
        for i in range(n):
            if i in specials:
                tokens.append(b"\xff" + specials[i].encode("utf-8"))
            elif i < tokenizer.vocab_size:
                tokens.append(_token_bytes(tokenizer, i))
            else:  # a virtual EOS past the vocabulary (a tokenizer without one): never produced
                tokens.append(b"\xff<|virtual_eos|>")
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = sorted(i for i in specials if i < n) + ([eos] if eos >= tokenizer.vocab_size else [])
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return [int(t) for t in self._tokenizer.encode(text)]


def _token_bytes(tokenizer, i: int) -> bytes:
    if tokenizer.kind == "byte":
        return bytes([i])
    if tokenizer.kind == "char":
        return tokenizer.chars[i].encode("utf-8", errors="surrogatepass")
    return tokenizer.decode([i]).encode("utf-8")


def ll_tokenizer(tokenizer):
    """The llguidance LLTokenizer of a jaxlm tokenizer (model/tokenizer.py) (GrammarCompiler keeps one).
    Byte and char vocabularies are given token by token; a BPE (byte-level, Hugging Face) is handed
    to llguidance whole, which maps its byte-level pieces itself. A tokenizer without EOS gets a
    virtual one one past the vocabulary (the model can never choose it, so such a request ends when
    its grammar is complete)."""
    import llguidance

    eos = tokenizer.eos_id
    if tokenizer.kind == "bpe":
        return llguidance.LLTokenizer(tokenizer._tok.to_str(), n_vocab=tokenizer.vocab_size, eos_token=eos)
    n = tokenizer.vocab_size + (eos is None)
    eos = tokenizer.vocab_size if eos is None else eos
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tokenizer, n, eos)), n_vocab=n, eos_token=eos)


# ---- grammars and matchers ----------------------------------------------------------------------

class Grammar:
    """A compiled response_format for one tokenizer (immutable, shared by requests and the cache).
    `matcher()` gives a request its own parser state."""

    def __init__(self, key: str, tokenizer, template):
        self.key = key  # the schema as compact JSON (the cache key)
        self.tokenizer = tokenizer
        self._template = template  # an llguidance LLMatcher in its initial state, never advanced
        self._lock = threading.Lock()

    def matcher(self) -> "Matcher":
        with self._lock:
            return Matcher(self._template.deep_copy(), self.tokenizer.vocab_size)


class Matcher:
    """One request's position in its grammar: the mask of tokens allowed next, consuming the token
    chosen, and whether the grammar is complete. Used by the engine thread only."""

    def __init__(self, ll_matcher, vocab_size: int):
        self._m = ll_matcher
        self._v = vocab_size

    def fill_mask(self, row: np.ndarray) -> bool:
        """Write the allowed next tokens into row (V,) bool; False if the matcher failed (its
        limits ran out mid-reply) or allows nothing."""
        bits = np.unpackbits(np.frombuffer(self._m.compute_bitmask(), np.uint8), bitorder="little")
        n = min(len(row), self._v, len(bits))
        row[:n] = bits[:n].astype(bool)
        row[n:] = False
        return not self._m.is_error() and bool(row.any())

    def consume(self, token: int) -> bool:
        return bool(self._m.consume_token(int(token)))

    @property
    def complete(self) -> bool:
        """The grammar can take nothing more (a JSON value closed): the request ends here."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """What was generated is a whole value (it may still go on, e.g. a number)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        return _first_line(self._m.get_error())


class GrammarCompiler:
    """Compiles response_formats for one tokenizer off the caller's thread, under a time limit,
    with a bounded LRU cache (see the module docstring)."""

    def __init__(self, tokenizer, *, timeout_s: float = DEFAULT_TIMEOUT_S, cache_size: int = DEFAULT_CACHE_SIZE,
                 workers: int = 2):
        if not timeout_s > 0 or cache_size < 1 or workers < 1:
            raise ValueError("timeout_s must be > 0, cache_size and workers >= 1")
        self.tokenizer = tokenizer
        self.timeout_s = float(timeout_s)
        self.cache_size = int(cache_size)
        self._cache: collections.OrderedDict[str, Grammar | StructuredOutputError] = collections.OrderedDict()
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="grammar")
        self.compiled = 0  # compiles run (cache misses), for tests and metrics
        self._ll = None  # the tokenizer as llguidance sees it, made at the first compile
        self._ll_lock = threading.Lock()  # not self._lock: cache hits must not wait on building it

    def _ll_tokenizer(self):
        with self._ll_lock:
            if self._ll is None:
                self._ll = ll_tokenizer(self.tokenizer)
            return self._ll

    @staticmethod
    def key(response_format: dict) -> str | None:
        """The cache key: the schema as compact JSON (None: no constraint; the format's name is not
        part of it). Key order is kept: the output writes properties in the schema's order.
        Raises StructuredOutputError."""
        schema = schema_of(response_format)
        if schema is None:
            return None
        key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        if len(key) > MAX_SCHEMA_CHARS:
            raise StructuredOutputError(f"the schema has {len(key)} characters as JSON; at most {MAX_SCHEMA_CHARS} "
                                        "are allowed", "response_format.json_schema.schema")
        return key

    def submit(self, response_format: dict) -> concurrent.futures.Future | None:
        """A future of the Grammar (done at once on a cache hit; its exception a StructuredOutputError);
        None when the format asks for no constraint."""
        key = self.key(response_format)
        if key is None:
            return None
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                fut: concurrent.futures.Future = concurrent.futures.Future()
                fut.set_exception(hit) if isinstance(hit, Exception) else fut.set_result(hit)
                return fut
            fut = self._inflight.get(key)
            if fut is None:
                fut = self._inflight[key] = self._pool.submit(self._compile, key)
            return fut

    def compile(self, response_format: dict) -> Grammar | None:
        """Blocking: the Grammar, or StructuredOutputError (also when compiling exceeds timeout_s)."""
        fut = self.submit(response_format)
        if fut is None:
            return None
        try:
            return fut.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise self._timeout() from None

    async def compile_async(self, response_format: dict) -> Grammar | None:
        """As compile, awaited on an event loop (which never waits on the compile itself)."""
        fut = self.submit(response_format)
        if fut is None:
            return None
        done, _ = await asyncio.wait([asyncio.wrap_future(fut)], timeout=self.timeout_s)
        if not done:
            raise self._timeout()
        return done.pop().result()

    def _timeout(self) -> StructuredOutputError:
        return StructuredOutputError(f"the schema did not compile within {self.timeout_s:g} s; simplify it",
                                     "response_format.json_schema.schema")

    def _compile(self, key: str) -> Grammar:
        """In a pool thread: compile, cache the outcome (grammar or error), return or raise it."""
        try:
            result: Grammar | StructuredOutputError = self._build(key)
        except StructuredOutputError as e:
            result = e
        except ImportError:
            result = StructuredOutputError("response_format needs the llguidance package on the server "
                                           "(pip install 'jaxlm[serve]')")
        except Exception as e:  # noqa: BLE001: whatever llguidance raises on a schema is the client's 400
            result = StructuredOutputError(f"response_format: the schema cannot be compiled: {_first_line(str(e))}",
                                           "response_format.json_schema.schema")
        with self._lock:
            self.compiled += 1
            self._inflight.pop(key, None)
            self._cache[key] = result
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if isinstance(result, Exception):
            raise result
        return result

    def _build(self, key: str) -> Grammar:
        from llguidance import LLMatcher, LLParserLimits

        tok = self._ll_tokenizer()
        limits = LLParserLimits(**LIMITS)
        schema = json.loads(key)
        param = "response_format.json_schema.schema"
        grammar = LLMatcher.grammar_from_json_schema(key, overrides=dict(JSON_OPTIONS))
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tok, limits=limits)
        if is_error:
            raise StructuredOutputError(f"{param}: {_first_line(messages[0]) if messages else 'invalid schema'}",
                                        param)
        template = LLMatcher(tok, grammar, log_level=0, limits=limits)
        first = template.deep_copy()
        first.compute_bitmask()  # builds the first lexer state; the template stays initial
        if template.is_error() or first.is_error():
            raise StructuredOutputError(f"{param}: {_first_line(template.get_error() or first.get_error())}", param)
        quote = tok.tokenize_str('"')
        for path, pattern in _patterns(schema, ""):
            # as written, and anchored: an unanchored pattern is built only when the text reaches it
            for regex in (pattern, f"^(?:{pattern})$"):
                alone = LLMatcher(tok, LLMatcher.grammar_from_json_schema({"type": "string", "pattern": regex},
                                                                          overrides=dict(JSON_OPTIONS)),
                                  log_level=0, limits=limits)
                alone.compute_bitmask()
                alone.consume_tokens(quote)
                alone.compute_bitmask()
                if alone.is_error():
                    raise StructuredOutputError(f"{param}{path}.pattern {pattern[:60]!r} is beyond the regex limits: "
                                                f"{_first_line(alone.get_error())}", f"{param}{path}.pattern")
        return Grammar(key, self.tokenizer, template)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _patterns(node: Any, path: str):
    """(path, regex) of every `pattern` keyword in a schema (walking every subschema container)."""
    if isinstance(node, dict):
        if isinstance(node.get("pattern"), str):
            yield path, node["pattern"]
        for k, v in node.items():
            if k in ("enum", "const", "default", "examples"):
                continue
            yield from _patterns(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _patterns(v, f"{path}.{i}")

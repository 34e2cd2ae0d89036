"""Grammar-constrained decoding with llguidance behind the engine's ``Constraint`` interface.

``GrammarCompiler.compile(kind, value)`` checks a grammar once per request (the errors become
422s) and returns a factory: every sequence of the request (``best_of``, ``n``) gets its own
matcher. The engine's sampler applies the batched bitmask the matchers fill.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

from genserve.engine.constraints import Constraint

logger = logging.getLogger(__name__)


class GrammarError(ValueError):
    """The grammar is not valid; the message says why."""


class LLGuidanceConstraint(Constraint):
    """One sequence's llguidance ``LLMatcher`` (regex, JSON Schema and tool-call grammars alike).

    llguidance keeps the consumed tokens for ``LLMatcher.rollback``, except a token consumed
    while the matcher is already stopped (an EOS after the grammar ended): that one does not
    enter its history, so it is counted here (``_after_stop``; vLLM's guidance backend keeps
    the same "rollback lag"). Such tokens are always the latest ones: a stopped matcher stays
    stopped until a rollback crosses the token that stopped it.
    """

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._consumed = 0  # tokens in llguidance's history: a rollback past them would break it
        self._after_stop = 0  # advances made while stopped, not in llguidance's history

    def fill_bitmask(self, bitmask, row: int) -> None:
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, bitmask, row)

    def advance(self, token_id: int) -> None:
        stopped = self.matcher.is_stopped()
        # Checked first: a token llguidance refuses leaves the matcher in its error state (for
        # good: it reads as stopped and cannot roll back); this way the constraint stays usable.
        # A stopped matcher takes EOS only (validate_tokens says 0 for everything then).
        if (not stopped and self.matcher.validate_tokens([token_id]) != 1) or not self.matcher.consume_token(token_id):
            raise ValueError(f"the grammar does not allow token {token_id}"
                             + (f": {self.matcher.get_error()}" if self.matcher.is_error() else ""))
        if stopped:
            self._after_stop += 1
        else:
            self._consumed += 1

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= self._consumed + self._after_stop:
            # Checked here: llguidance would refuse too, but leave the matcher in its error state.
            raise ValueError(f"cannot roll back {num_tokens} tokens: "
                             f"{self._consumed + self._after_stop} were consumed")
        uncounted = min(num_tokens, self._after_stop)
        self._after_stop -= uncounted
        num_tokens -= uncounted
        if num_tokens:
            if not self.matcher.rollback(num_tokens):
                raise ValueError(f"grammar rollback failed: {self.matcher.get_error()}")
            self._consumed -= num_tokens

    def valid_prefix(self, token_ids: list[int]) -> int:
        # llguidance answers 0 for a list holding any id outside its vocabulary: the ids
        # before the first such one are checked alone.
        inside = next((i for i, t in enumerate(token_ids) if not 0 <= t < self.vocab_size), len(token_ids))
        if not inside or self.matcher.is_stopped():
            return 0
        return self.matcher.validate_tokens(token_ids[:inside])


def json_schema_of(value: Any, require_properties: bool) -> dict:
    """TGI's rules for a ``json`` grammar: an object (or JSON text of one) that is a valid schema."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"grammar is not valid: {exc}") from None
    if not isinstance(value, dict):
        raise GrammarError("grammar is not valid: a JSON Schema must be an object")
    try:
        import jsonschema

        jsonschema.Draft202012Validator.check_schema(value)
    except ImportError:  # pragma: no cover - jsonschema is a dependency
        pass
    except Exception as exc:  # jsonschema.SchemaError
        raise GrammarError(f"grammar is not valid: {getattr(exc, 'message', exc)}") from None
    if require_properties and "properties" not in value:
        raise GrammarError("grammar is not valid: Grammar must have a 'properties' field")
    return value


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lltok = None
        self._lock = threading.Lock()
        self.unsupported: str | None = None  # why grammars cannot work, once ``check`` found out

    @property
    def available(self) -> bool:
        """Grammars can be compiled for this tokenizer (as far as known: ``check`` loads it)."""
        return self.unsupported is None and self._missing() is None

    def _missing(self) -> str | None:
        try:
            import llguidance  # noqa: F401
        except ImportError:
            return "llguidance is not installed"
        if self._hf_tokenizer is None or not hasattr(self._hf_tokenizer, "backend_tokenizer"):
            return "grammars need a fast (tokenizers) tokenizer"
        return None

    def check(self) -> str | None:
        """Load this tokenizer into llguidance now (about a second) instead of on the first
        request; returns None when grammars work, else why not (kept in ``unsupported``).
        llguidance refuses some tokenizers, e.g. a SentencePiece-style Metaspace decoder."""
        reason = self._missing()
        if reason is None:
            try:
                self._tokenizer()
            except Exception as exc:  # llguidance's ValueError, or anything its loader raises
                reason = f"llguidance cannot load this tokenizer: {exc}"
        self.unsupported = reason
        if reason is None:
            self._warm_masks()
        return reason

    def _warm_masks(self) -> None:
        """Fill one token mask now. The first fill imports ``llguidance.torch`` (seconds, holding
        the GIL), which would otherwise happen inside the first grammar request's engine step
        and stall every stream for as long (measured: 6.4 s on 2 cores)."""
        import torch

        make = self.compile("regex", "[0-9]")
        make().fill_bitmask(torch.full((1, (self._vocab_size + 31) // 32), -1, dtype=torch.int32), 0)

    def _tokenizer(self):
        with self._lock:
            if self._lltok is None:
                from copy import copy

                import llguidance

                backend = copy(self._hf_tokenizer.backend_tokenizer)
                backend.no_padding()
                backend.no_truncation()
                self._lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=self._vocab_size,
                                                     eos_token=self._eos or None)
            return self._lltok

    def grammar_text(self, kind: str, value: Any) -> str:
        from llguidance import LLMatcher

        if kind == "regex":
            if not isinstance(value, str) or not value:
                raise GrammarError("grammar is not valid: a regex grammar needs a non-empty string")
            return LLMatcher.grammar_from_regex(value)
        if kind == "json":
            schema = json_schema_of(value, require_properties=True)
        elif kind == "json_schema":
            if isinstance(value, dict) and isinstance(value.get("schema"), dict):
                value = value["schema"]  # OpenAI's {name, schema}
            schema = json_schema_of(value, require_properties=False)
        elif kind == "json_object":
            schema = {"type": "object"}
        else:
            raise GrammarError(f"grammar type {kind!r} is not supported")
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except Exception as exc:
            raise GrammarError(f"grammar is not valid: {exc}") from None

    def compile(self, kind: str, value: Any) -> Callable[[], LLGuidanceConstraint]:
        """Validate a grammar; return a factory of fresh constraints. Raises ``GrammarError``."""
        if not self.available:
            raise GrammarError(f"grammar is not supported: {self.unsupported or self._missing()}")
        from llguidance import LLMatcher

        text = self.grammar_text(kind, value)
        tok = self._tokenizer()
        error = LLMatcher.validate_grammar(text, tok)
        if error:
            raise GrammarError(f"grammar is not valid: {error.splitlines()[0][:500]}")

        # Built here, on a validation worker: construction can take a second for a large grammar
        # (a 50,000-value enum) and would stall every stream if the event loop did it. Each
        # sequence gets a copy, which is cheap.
        prototype = LLMatcher(tok, text, log_level=0)
        if prototype.is_error():
            raise GrammarError(f"grammar is not valid: {prototype.get_error()}")

        def make() -> LLGuidanceConstraint:
            return LLGuidanceConstraint(prototype.deep_copy(), self._vocab_size)

        return make

"""The request bodies, checked by pydantic (unknown fields refused) and then against the server's bounds;
every refusal is a 4xx JSON error naming the field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragkit.io.jsonl import first_path, lone_surrogate_at
from ragkit.io.queries import QUERY_FIELDS, query_field
from ragkit.serve.backend import Query
from ragkit.serve.config import ServeConfig


class RequestError(Exception):
    """A request the server refuses: `status`, the field, and one line saying why."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


class _Strict(BaseModel):
    # strict: "k": true was taken as k = 1, "k": "3" as 3; JSON's types are the request's types
    model_config = ConfigDict(extra="forbid", strict=True)


MAX_INT_DIGITS = 19  # an int64; Python's json gives up at 4,300 digits with a ValueError (FastAPI: a bare 400)


class _Refused:
    """Stands for a JSON value the parser must not build (a huge integer, NaN, Infinity) until the walk
    after parsing finds which field holds it."""

    def __init__(self, what: str) -> None:
        self.what = what


def check_json_body(body: bytes) -> None:
    """Refuse, naming the field, a JSON body that FastAPI's parser would turn into a bare 400 (invalid UTF-8,
    nesting deeper than Python's parser goes, an integer of thousands of digits) or into a number no field
    means (NaN, Infinity). A body that is not JSON at all is left to FastAPI (422 json_invalid)."""
    import json

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("body", f"not UTF-8 text (byte {exc.start})") from None
    refused = []

    def huge_int(digits: str) -> Any:
        if len(digits.lstrip("-")) <= MAX_INT_DIGITS:
            return int(digits)
        refused.append(_Refused(f"an integer of {len(digits.lstrip('-'))} digits"))
        return refused[-1]

    def constant(name: str) -> Any:
        refused.append(_Refused(f"{name} is not a JSON number"))
        return refused[-1]

    try:
        parsed = json.loads(text, parse_int=huge_int, parse_constant=constant)
    except json.JSONDecodeError:
        return
    except RecursionError:
        raise RequestError("body", "JSON nested too deeply") from None
    if refused:  # the parser meets values in document order: the first refused is the first in the body
        field = first_path(parsed, lambda item: item is refused[0]) or "body"
        raise RequestError(field, f"{field}: {refused[0].what}")


class SearchBody(_Strict):
    query: str | dict[str, Any] | None = Field(None, description="one query: text, or a row with query/question")
    queries: list[str | dict[str, Any]] | None = Field(None, description="several queries, searched together")
    k: int = Field(10, ge=1, description="hits per query")
    mode: Literal["dense", "sparse", "hybrid"] = "dense"
    fusion: Literal["rrf", "score"] = "rrf"
    dense_weight: float = Field(0.5, ge=0.0, le=1.0)


class GenerateBody(SearchBody):
    k: int | None = Field(None, ge=1, description="passages read per answer (default: the server's --k)")  # type: ignore[assignment]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(BaseModel):
    """OpenAI's chat-completions request; fields ragkit cannot honour are refused by `check_chat`."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool = False
    n: int = 1
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None


def parse_queries(body: SearchBody, config: ServeConfig, *, k_default: int | None = None) -> list[Query]:
    """The request's queries, in `ragkit index search`'s row form, within the server's bounds."""
    if (body.query is None) == (body.queries is None):
        raise RequestError("queries", "give either 'query' (one) or 'queries' (a list)")
    items = [body.query] if body.queries is None else body.queries
    where = "query" if body.queries is None else "queries"
    if not items:
        raise RequestError("queries", "the list is empty")
    if len(items) > config.max_queries:
        raise RequestError("queries", f"{len(items)} queries; this server takes at most {config.max_queries} "
                                      "per request (--max-queries)", status=413)
    out = []
    for i, item in enumerate(items):
        name = where if body.queries is None else f"queries[{i}]"
        refuse_unencodable(item, name)
        if isinstance(item, str):
            text, qid, extra = item, None, {}
        else:
            key = query_field(item)
            if key is None:
                raise RequestError(name, f"no query text (give one of {', '.join(QUERY_FIELDS)} as a non-empty string)")
            text, qid = item[key], item.get("id", item.get("_id"))
            extra = {k: v for k, v in item.items() if k not in ("id", "_id", "query")}
        if not text.strip():
            raise RequestError(name, "the query text is empty")
        if len(text) > config.max_query_chars:
            raise RequestError(name, f"{len(text)} characters; at most {config.max_query_chars} (--max-query-chars)",
                               status=413)
        out.append(Query(str(qid) if qid is not None else str(i + 1), text, extra))
    return out


def refuse_unencodable(value: Any, field: str) -> None:
    """Text the tokenizer, SQLite and the response writer would each fail on, inside a batch shared with other
    requests (a lone surrogate): refused here, naming the field, before the request joins a batch."""
    found = lone_surrogate_at(value, field)
    if found is not None:
        raise RequestError(found, "not valid Unicode text: it holds a lone surrogate")


def check_k(k: int, limit: int, flag: str) -> int:
    if k > limit:
        raise RequestError("k", f"{k}: at most {limit} ({flag})")
    return k


def chat_question(body: ChatBody, config: ServeConfig, served_model: str) -> str:
    """The one user question of a chat request. ragkit's readers answer a question from passages: a system
    prompt or earlier turns would be dropped, so they are refused rather than ignored."""
    if body.stream:
        raise RequestError("stream", "streaming is not supported: send stream=false")
    if body.n != 1:
        raise RequestError("n", f"{body.n}: this server returns one answer per request")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name)
        if value is not None and value != config.max_new_tokens:
            raise RequestError(name, f"{value}: this server generates {config.max_new_tokens} new tokens at most "
                                     "(ragkit serve --max-new-tokens); leave it out or send that value")
    if body.temperature not in (None, 0, 0.0):
        raise RequestError("temperature", f"{body.temperature}: this server decodes greedily; send 0 or leave it out")
    if body.model is not None and body.model not in (served_model, "ragkit"):
        raise RequestError("model", f"'{body.model}': this server serves '{served_model}'", status=404)
    known = {"model", "messages", "stream", "n", "max_tokens", "max_completion_tokens", "temperature", "user"}
    extra = sorted(set(body.model_extra or {}) - known)
    if extra:
        raise RequestError(extra[0], "not supported by this server")
    if len(body.messages) != 1 or body.messages[0].role != "user":
        roles = [m.role for m in body.messages]
        raise RequestError("messages", f"roles {roles}: send exactly one user message (ragkit's readers answer one "
                                       "question from retrieved passages; system prompts and earlier turns are not used)")
    content = body.messages[0].content
    refuse_unencodable(content, "messages[0].content")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise RequestError("messages[0].content", "only text parts are supported")
        content = "\n".join(parts)  # type: ignore[arg-type]
    if not isinstance(content, str) or not content.strip():
        raise RequestError("messages[0].content", "the question is empty")
    if len(content) > config.max_query_chars:
        raise RequestError("messages[0].content", f"{len(content)} characters; at most {config.max_query_chars}",
                           status=413)
    return content

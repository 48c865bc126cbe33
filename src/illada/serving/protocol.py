"""The OpenAI wire format: request validation into a `GenerationRequest`, response and stream-chunk shapes, and
OpenAI-style error objects ({"error": {"message", "type", "param", "code"}}).

Validation is explicit (no schema library) so every mistake gets one message naming the offending field.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from illada.errors import IlladaError
from illada.sampling.config import SamplingConfig

# Sampler knobs accepted as extra body fields: the SamplingConfig fields with a wire name (their types, choices and
# bounds come from there). Temperature, top_p, seed, max_tokens and stop are the OpenAI fields of the same meaning.
SAMPLER_FIELDS: dict[str, dataclasses.Field] = {f.metadata["wire"] or f.name: f
                                                for f in SamplingConfig.user_fields("wire")}
# OpenAI fields we accept and ignore (they have no meaning for this sampler or carry bookkeeping only).
IGNORED_FIELDS = {"user", "presence_penalty", "frequency_penalty", "logit_bias", "metadata", "store",
                  "service_tier", "parallel_tool_calls", "response_format"}
# OpenAI fields we refuse unless they hold their "off" value.
UNSUPPORTED_FIELDS = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                      "best_of": (None, 1), "tools": (None, []), "functions": (None, []),
                      "tool_choice": (None, "none")}
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                 "illada_stream_canvas"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "suffix", "illada_infill", "illada_allow_shorter"}
# Sampler knobs that mean nothing for a canvas with holes (the holes' lengths are given, there are no blocks).
NOT_FOR_INFILL = ("block_length", "variable_length", "stop")
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error answered to the client as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass
class Limits:
    """What one request may ask for."""

    max_prompt_tokens: int | None = None  # None: the model context minus one
    max_tokens: int = 1024  # the largest max_tokens accepted
    default_max_tokens: int = 128
    max_n: int = 8  # choices per prompt
    max_prompts: int = 16  # prompts in one completions request
    max_body_bytes: int = 1 << 20


@dataclass
class GenerationRequest:
    """A validated request: one token list per choice row, and the sampler options shared by every row."""

    chat: bool
    model: str
    rows: list[list[int]]  # row i is choice i: prompt i // n
    prompt_tokens: list[int]  # per row
    n: int  # choices per prompt
    config: Any  # SamplingConfig (an InfillConfig for infill requests), with the model's token ids
    stop: tuple[str, ...] = ()
    stream: bool = False
    stream_canvas: bool = False
    include_usage: bool = False
    infill: list[list] | None = None  # infill requests: per row, its pieces (str: text, int: a hole of N tokens)
    infill_whole: bool = False  # answer the whole text with its holes filled (placeholders), not just the gap
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise bad("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    _check_text(body)
    return body


def _check_text(body: dict) -> None:
    """Every string of the body (keys too) must be valid Unicode: JSON can spell a lone surrogate ("\\ud800"),
    which no tokenizer can encode. 400 naming the field, as `messages[0].content`."""
    stack: list[tuple[str | None, str, Any]] = [(None, key, value) for key, value in body.items()]
    while stack:
        parent, where, value = stack.pop()
        for text, place in ((where, parent), (value, where)):
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                # the reply itself must be encodable: the field path is escaped, the bad text never echoed
                place = None if place is None else place.encode("utf-8", "backslashreplace").decode("utf-8")
                what = "a field name" if text is where else "a string"
                raise bad(f"{what} in {f'{place!r}' if place else 'the request'} is not valid Unicode text (a lone "
                          f"surrogate U+{ord(text[error.start]):04X} at character {error.start})",
                          place, "invalid_value") from None
        if isinstance(value, dict):
            stack.extend((where, f"{where}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((where, f"{where}[{i}]", v) for i, v in enumerate(value))


# -- field readers ---------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # rejects NaN


def read_int(body: dict, name: str, default: Any, low: int | None = None, high: int | None = None) -> Any:
    """body[name] as an int in [low, high]; a missing field or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise bad(f"'{name}' must be an integer, got {json.dumps(value)}", name, "invalid_type")
    if low is not None and value < low:
        raise bad(f"'{name}' must be >= {low}, got {value}", name, "invalid_value")
    if high is not None and value > high:
        raise bad(f"'{name}' must be <= {high}, got {value}", name, "invalid_value")
    return value


def read_float(body: dict, name: str, default: Any, low: float | None = None, high: float | None = None) -> Any:
    """body[name] as a float in [low, high]; a missing field or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise bad(f"'{name}' must be a number, got {json.dumps(value)}", name, "invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise bad(f"'{name}' must be in {bounds}, got {value}", name, "invalid_value")
    return float(value)


def read_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {json.dumps(value)}", name, "invalid_type")
    return value


def read_choice(body: dict, name: str, choices: tuple[str, ...]) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if value not in choices:
        raise bad(f"'{name}' must be one of {', '.join(choices)}, got {json.dumps(value)}", name, "invalid_value")
    return value


def read_stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > 4:
        raise bad("'stop' must be a string or a list of at most 4 strings", "stop", "invalid_type")
    return tuple(s for s in value if s)


def read_sampler_fields(body: dict) -> dict:
    """The illada sampler knobs present in the body, type-checked (null means the default), by field name."""
    options: dict = {}
    for wire, f in SAMPLER_FIELDS.items():
        if body.get(wire) is None:
            continue
        kind, meta = str(f.type), f.metadata
        if meta["choices"]:
            options[f.name] = read_choice(body, wire, meta["choices"])
        elif kind == "bool":
            options[f.name] = read_bool(body, wire, False)
        elif kind.startswith("int"):
            options[f.name] = read_int(body, wire, None, meta["low"], meta["high"])
        else:
            options[f.name] = read_float(body, wire, None, meta["low"], meta["high"])
    return options


def check_fields(body: dict, allowed: set[str]) -> None:
    """Unknown fields are errors (a misspelt sampler knob must not be ignored silently)."""
    for name, value in body.items():
        if name in allowed or name in SAMPLER_FIELDS or name in IGNORED_FIELDS:
            continue
        if name in UNSUPPORTED_FIELDS:
            if any(value == off and type(value) is type(off) for off in UNSUPPORTED_FIELDS[name]):
                continue  # the field's "off" value
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
        raise bad(f"unknown field '{name}'", name, "unknown_parameter")


# -- requests --------------------------------------------------------------------------------------------------
def _message_text(message: Any, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad(f"'{param}' must be an object with 'role' and 'content'", param, "invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise bad(f"'{param}.role' must be one of {', '.join(ROLES)}, got {json.dumps(role)}", param + ".role",
                  "invalid_value")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is meaningful here
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"'{param}.content' parts must be {{\"type\": \"text\", \"text\": ...}}",
                          param + ".content", "invalid_type")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad(f"'{param}.content' must be a string", param + ".content", "invalid_type")
    return {"role": role, "content": content}


def _completion_prompts(body: dict, encode: Callable[[str], list[int]], vocab_size: int,
                        limits: Limits) -> list[list[int]]:
    """OpenAI's `prompt`: a string, a list of strings, a list of token ids or a list of token-id lists."""
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts = [encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(t) for t in p)
                                                     for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise bad("'prompt' must be a string, a list of strings or a list of token ids", "prompt", "invalid_type")
    if len(prompts) > limits.max_prompts:
        raise bad(f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", "prompt",
                  "invalid_value")
    for tokens in prompts:
        if any(t < 0 or t >= vocab_size for t in tokens):
            raise bad(f"token ids must be in [0, {vocab_size})", "prompt", "invalid_value")
    return prompts


def parse_request(body: dict, *, chat: bool, handle, model_ids: tuple[str, ...], limits: Limits,
                  defaults: SamplingConfig | None = None) -> GenerationRequest:
    """Validate an OpenAI completions / chat request against the model and the limits.

    `defaults`: the server's sampler settings (`illada serve`'s flags), under the request's fields; `handle` (a
    DiffusionLM) completes them with its token ids. Raises ApiError (400/404) with the offending field as
    `param`.
    """
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = body.get("model", model_ids[0])
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    if model not in model_ids:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_ids[0]}'",
                       "invalid_request_error", "model", "model_not_found")
    if not chat and (read_bool(body, "illada_infill", False) or body.get("suffix") not in (None, "")):
        return _parse_infill(body, model, handle, limits, defaults)
    tokenizer = handle.tokenizer
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list", "messages",
                      "missing_required_parameter" if messages is None else "invalid_type")
        messages = [_message_text(m, i) for i, m in enumerate(messages)]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            prompts = [tokenizer.encode(text)]
        except IlladaError as error:
            raise bad(str(error), "messages") from None
    else:
        prompts = _completion_prompts(body, tokenizer.encode, handle.config.vocab_size, limits)

    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = read_int(body, name, limits.default_max_tokens, 1, limits.max_tokens)
    n = read_int(body, "n", 1, 1, limits.max_n)
    stream, stream_canvas, include_usage = _read_stream(body)
    stop = read_stop(body)

    options = read_sampler_fields(body)
    temperature = read_float(body, "temperature", None, 0.0, 2.0)
    if temperature is not None:
        options["temperature"] = temperature
    top_p = read_float(body, "top_p", None, 0.0, 1.0)
    if top_p is not None and top_p < 1.0:
        if top_p <= 0:
            raise bad("'top_p' must be in (0, 1]", "top_p", "invalid_value")
        options["top_p"] = top_p
    seed = read_int(body, "seed", None)
    if seed is not None:
        options["seed"] = seed
    options["gen_length"] = max_tokens
    if stop:
        options["stop_strings"] = stop

    bos = tokenizer.bos_token_id
    if bos is not None:  # an empty prompt starts from BOS: the canvas needs something to condition on
        prompts = [p or [bos] for p in prompts]
    context = handle.config.max_seq_len
    longest = max(len(p) for p in prompts)
    prompt_limit = min(limits.max_prompt_tokens or context - 1, context - 1)
    if longest > prompt_limit:
        raise bad(f"the prompt has {longest} tokens; this server accepts at most {prompt_limit} "
                  f"(model context {context})", "messages" if chat else "prompt", "context_length_exceeded")
    if min(len(p) for p in prompts) == 0:
        raise bad("the prompt is empty", "messages" if chat else "prompt", "invalid_value")
    # Each row's budget is max_tokens capped by the context after its own prompt, in both modes (the sampler and
    # the batcher do it per row; finish_reason "length" then means that budget was used up).
    try:
        config = handle.sampling_config(defaults, **options)
    except IlladaError as error:
        raise bad(str(error)) from None

    rows = [list(p) for p in prompts for _ in range(n)]
    prefix = "chatcmpl-" if chat else "cmpl-"
    return GenerationRequest(chat=chat, model=model, rows=rows, prompt_tokens=[len(r) for r in rows], n=n,
                             config=config, stop=stop, stream=stream, stream_canvas=stream_canvas,
                             include_usage=include_usage, id=prefix + uuid.uuid4().hex[:24])


def _read_stream(body: dict) -> tuple[bool, bool, bool]:
    """(stream, illada_stream_canvas, stream_options.include_usage), checked."""
    stream = read_bool(body, "stream", False)
    stream_canvas = read_bool(body, "illada_stream_canvas", False)
    if stream_canvas and not stream:
        raise bad("'illada_stream_canvas' needs 'stream': true", "illada_stream_canvas", "invalid_value")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    return stream, stream_canvas, read_bool(stream_options or {}, "include_usage", False)


def _parse_infill(body: dict, model: str, handle, limits: Limits,
                  defaults: SamplingConfig | None) -> GenerationRequest:
    """An infill completion: OpenAI's insert mode (`suffix`: max_tokens tokens between `prompt` and `suffix`,
    answered as the inserted text) or, with `"illada_infill": true`, a prompt with `<|mask:N|>` holes
    (answered as the whole text with its holes filled). Streamed, the text is sent as it becomes final: up to the
    first position still masked."""
    from illada.holes import parse_holes
    from illada.sampling import InfillConfig

    suffix, placeholders = body.get("suffix"), read_bool(body, "illada_infill", False)
    if suffix not in (None, "") and placeholders:
        raise bad("use either 'suffix' (insert mode) or 'illada_infill' (<|mask:N|> holes in the prompt), not both",
                  "suffix", "invalid_value")
    if suffix is not None and not isinstance(suffix, str):
        raise bad("'suffix' must be a string", "suffix", "invalid_type")
    stream, stream_canvas, include_usage = _read_stream(body)
    for name in NOT_FOR_INFILL:
        if body.get(name) is not None:
            raise bad(f"'{name}' does not apply to infill requests", name, "unsupported_parameter")
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise bad("'prompt' must be a string or a list of strings for infill", "prompt", "invalid_type")
    if len(prompts) > limits.max_prompts:
        raise bad(f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", "prompt", "invalid_value")
    if placeholders:
        try:
            rows = [parse_holes(p) for p in prompts]
        except IlladaError as error:
            raise bad(str(error), "prompt", "invalid_placeholder") from None
    else:
        length = read_int(body, "max_tokens", min(limits.default_max_tokens, limits.max_tokens), 1, limits.max_tokens)
        rows = [[p, length, suffix] for p in prompts]
    for pieces in rows:
        if sum(p for p in pieces if isinstance(p, int)) > limits.max_tokens:
            raise bad(f"the holes ask for more than {limits.max_tokens} tokens", "prompt", "invalid_value")
    n = read_int(body, "n", 1, 1, limits.max_n)
    options = read_sampler_fields(body)
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = read_float(body, name, None, low, high)
        if value is not None and not (name == "top_p" and value >= 1.0):
            options[name] = value
    seed = read_int(body, "seed", None)
    if seed is not None:
        options["seed"] = seed
    options["allow_shorter"] = read_bool(body, "illada_allow_shorter", False)
    shared = {} if defaults is None else InfillConfig.knobs_of(defaults)
    try:
        config = handle.infill_config(**{**shared, **options})
    except IlladaError as error:
        raise bad(str(error), None, "invalid_value") from None
    try:
        _, mask, holes = handle.encode_pieces(rows)
    except IlladaError as error:
        raise bad(str(error), "prompt", "context_length_exceeded") from None
    pieces = [list(p) for p in rows for _ in range(n)]
    context = [int(m.sum()) - sum(e - s for s, e in spans) for m, spans in zip(mask, holes)]
    return GenerationRequest(chat=False, model=model, rows=[[] for _ in pieces],
                             prompt_tokens=[c for c in context for _ in range(n)], n=n, config=config, infill=pieces,
                             infill_whole=placeholders, stream=stream, stream_canvas=stream_canvas,
                             include_usage=include_usage, id="cmpl-" + uuid.uuid4().hex[:24])


# -- responses -------------------------------------------------------------------------------------------------
@dataclass
class RowResult:
    """The finished generation of one choice row."""

    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    nfe: int


def usage(request: GenerationRequest, results: list[RowResult]) -> dict:
    prompt = sum(request.prompt_tokens[::request.n])  # each prompt once, as OpenAI counts it
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(request: GenerationRequest, results: list[RowResult]) -> dict:
    if request.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        kind = "chat.completion"
    else:
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        kind = "text_completion"
    return {"id": request.id, "object": kind, "created": request.created, "model": request.model,
            "choices": choices, "usage": usage(request, results),
            "illada": {"nfe": max((r.nfe for r in results), default=0)}}


def chunk(request: GenerationRequest, index: int, text: str | None, finish_reason: str | None = None,
          role: bool = False, extra: dict | None = None) -> dict:
    """One streamed chunk for choice `index` (text None: no text field change, e.g. a canvas-only update)."""
    if request.chat:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    body = {"id": request.id, "object": kind, "created": request.created, "model": request.model,
            "choices": [choice]}
    if extra is not None:
        body["illada"] = extra
    return body


def usage_chunk(request: GenerationRequest, results: list[RowResult]) -> dict:
    return {"id": request.id, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": request.created, "model": request.model, "choices": [], "usage": usage(request, results)}


def sse(data: dict | str) -> bytes:
    """One server-sent event: a `data:` line and the blank line that ends it."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)

"""A prompt read into a vLLM engine's own tokens: the model's tokenizer and chat template.

Precise routing (controlplane.gateway.kvfollow) names a request's KV blocks from the tokens
its engine will see, so for a vLLM replica the gateway renders a chat as vLLM does (the
checkpoint's Jinja chat template, in the sandbox and with the helpers transformers gives
it, `add_generation_prompt`, the special tokens as variables; then the text tokenized
without special tokens, the template having placed them) and a completion's prompt as vLLM
does (tokenized with them). The files come from an agent that serves the model (`GET
/models/{model}/tokenizer/{file}`: the checkpoint's own), once per model per web process.

What it does not read, it says so (None) and routing falls back to the prefix index: a
message with images or audio (their tokens are the engine's processor's), a template that
fails or iterates over content parts (vLLM's "openai" content format), a batch of prompts.
A misread costs cache hits, never a request: the names just do not match.

Bounded: the rendered text is read up to the request's cap (GATEWAY_PREFIX_HASH_KIB); the
tokens near a cut are dropped (a word cut short tokenizes otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from controlplane.gateway.apis import Api

# Tokens dropped before a cut in the text: a word cut short tokenizes otherwise.
_NEAR_CUT = 16
_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
             "mask_token")  # fmt: skip


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tags): the body
    as it is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:  # fmt: skip
    # transformers' own: Jinja's escapes HTML characters
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


def _environment() -> ImmutableSandboxedEnvironment:
    """As transformers compiles chat templates (vLLM renders with it)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _special(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    content = value.get("content") if isinstance(value, dict) else None
    return content if isinstance(content, str) else None


def _template_of(config: Mapping[str, Any], jinja_file: str | None) -> str | None:
    if jinja_file:
        return jinja_file
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


@dataclass(frozen=True)
class ModelTokenizer:
    tokenizer: Tokenizer
    template: jinja2.Template | None
    specials: Mapping[str, str]

    @classmethod
    def load(cls, files: Mapping[str, bytes]) -> ModelTokenizer:
        """From the checkpoint's files (TOKENIZER_FILES); ValueError when they cannot be read."""
        if "tokenizer.json" not in files:
            raise ValueError("the checkpoint has no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
            config = json.loads(files.get("tokenizer_config.json", b"{}"))
            mapped = json.loads(files.get("special_tokens_map.json", b"{}"))
            source = _template_of(
                config if isinstance(config, dict) else {},
                files["chat_template.jinja"].decode() if "chat_template.jinja" in files else None,
            )
            template = _environment().from_string(source) if source else None
        except Exception as exc:  # the tokenizers library raises its own kinds
            raise ValueError(f"the checkpoint's tokenizer cannot be read: {exc}") from None
        specials: dict[str, str] = {}
        for source_map in (mapped, config):
            if isinstance(source_map, dict):
                for name in _SPECIALS:
                    value = _special(source_map.get(name))
                    if value is not None:
                        specials.setdefault(name, value)
        return cls(tokenizer, template, specials)

    def ids(self, api: Api, body: Mapping[str, Any], cap: int) -> list[int] | None:
        """The prompt's token ids as the engine will see them (at most about `cap` bytes of
        text); None where this reading is not the engine's."""
        if api is Api.COMPLETIONS:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return list(prompt[: cap // 2])
            if not isinstance(prompt, str):
                return None
            return self._encode(prompt, cap, special=True)
        if api is Api.CHAT:
            messages = _conversation(body.get("messages"))
        elif api is Api.RESPONSES:
            messages = _responses_conversation(body)
        else:
            return None
        if messages is None or self.template is None:
            return None
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        try:
            text = self.template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                        **self.specials)  # fmt: skip
        except Exception:  # a template's own failure, whatever it raises
            return None
        return self._encode(text, cap, special=False)

    def _encode(self, text: str, cap: int, special: bool) -> list[int]:
        cut = len(text) > cap
        ids = self.tokenizer.encode(text[:cap], add_special_tokens=special).ids
        return ids[:-_NEAR_CUT] if cut else ids


def _text_of(content: Any) -> str | None:
    """A message's content as vLLM's "string" content format makes it: text parts joined by
    newlines; None for anything else in it (images, audio: the processor's tokens)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text"):
            return None
        if not isinstance(part.get("text"), str):
            return None
        texts.append(part["text"])
    return "\n".join(texts)


def _conversation(messages: Any) -> list[dict[str, Any]] | None:
    if not isinstance(messages, list):
        return None
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        content = _text_of(message.get("content"))
        if content is None and message.get("content") is not None:
            return None
        out.append({**message, "content": content})
    return out


def _responses_conversation(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A Responses request as the chat vLLM makes of it: instructions as the system message,
    then the input (a string: one user message)."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    value = body.get("input")
    if isinstance(value, str):
        return [*messages, {"role": "user", "content": value}]
    items = _conversation(value)
    return None if items is None else [*messages, *items]

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

import bisect
import hashlib
import json
from array import array
from collections import OrderedDict
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


class TokenPrefixes:
    """The token ids of texts' leading pieces, so that a prompt that starts as an earlier
    one did (a shared system prompt, a conversation's earlier turns) is tokenized only from
    about where they part: tokenizing is most of what reading a prompt costs (hundreds of
    µs for a few KB; bench/README.md).

    A text's pieces end every PIECE_CHARS characters, each keyed by a digest chained over
    all before it. A piece keeps the ids from where its parent's kept ones end to a
    boundary the tokenizer never merges across: a single space before a word, after a
    non-space (each word's pre-token starts with its space, in byte-level BPE and
    SentencePiece alike). A tokenizer for which that does not hold (`works`, checked once
    per model) gets no cache. Bounded: at most MAX_TOKENS ids kept, least recently used
    out first (a piece whose parent is gone is of no use, and ages out)."""

    PIECE_CHARS = 256
    MAX_TOKENS = 4_000_000  # 16 MB of 32-bit ids

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # digest → (where its ids end in the text, its parent's digest, its own ids)
        self.entries: OrderedDict[bytes, tuple[int, bytes | None, array[int]]] = OrderedDict()
        self.tokens = 0

    def encode(self, text: str) -> list[int]:
        """`text`'s ids, without special tokens: as the tokenizer gives them."""
        digests, link = [], b""
        for end in range(self.PIECE_CHARS, len(text) + 1, self.PIECE_CHARS):
            piece = text[end - self.PIECE_CHARS : end].encode("utf-8", "surrogatepass")
            link = hashlib.blake2b(link + piece, digest_size=16).digest()
            digests.append((end, link))
        start, parent, head = self._resume(digests)
        encoding = self.tokenizer.encode(text[start:], add_special_tokens=False)
        ids = encoding.ids
        ends = [start + offset[1] for offset in encoding.offsets]
        done = 0  # of `ids`, how many the pieces kept so far hold
        for end, digest in digests:
            if end <= start:
                continue
            kept = self._boundary(text, ends, bisect.bisect_right(ends, end))
            if kept is None or kept <= done:
                continue
            if digest not in self.entries:
                self._keep(digest, (ends[kept - 1], parent, array("I", ids[done:kept])))
            elif self.entries[digest][0] != ends[kept - 1]:
                break  # kept otherwise once: what follows would not chain
            parent, done = digest, kept
        return [*head, *ids]

    def _resume(self, digests: list[tuple[int, bytes]]) -> tuple[int, bytes | None, list[int]]:
        """Where the longest kept prefix of the text ends, its digest, and its ids."""
        for _end, digest in reversed(digests):
            chain: list[tuple[bytes, array[int]]] = []
            link: bytes | None = digest
            while link is not None and (found := self.entries.get(link)) is not None:
                chain.append((link, found[2]))
                link = found[1]
            if link is not None or not chain:
                continue  # a piece of it is gone
            ids: list[int] = []
            for key, piece in reversed(chain):
                self.entries.move_to_end(key)
                ids.extend(piece)
            return self.entries[digest][0], digest, ids
        return 0, None, []

    @staticmethod
    def _boundary(text: str, ends: list[int], count: int) -> int | None:
        """How many of the tokens to keep so that they end at a safe boundary (at most the
        first `count`); None when none of the last 32 does."""
        for kept in range(count, max(count - 32, 0), -1):
            at = ends[kept - 1]
            if (
                0 < at < len(text) - 1 and text[at] == " "
                and not text[at - 1].isspace() and not text[at + 1].isspace()
            ):  # fmt: skip
                return kept
        return None

    def _keep(self, digest: bytes, entry: tuple[int, bytes | None, array[int]]) -> None:
        self.entries[digest] = entry
        self.tokens += len(entry[2])
        while self.tokens > self.MAX_TOKENS and self.entries:
            _, (_, _, dropped) = self.entries.popitem(last=False)
            self.tokens -= len(dropped)

    def works(self) -> bool:
        """Whether a text tokenized from a kept piece reads as it does whole."""
        sample = " ".join(f"The quick brown fox {n} jumps, over the lazy dog." for n in range(80))
        whole = self.tokenizer.encode(sample, add_special_tokens=False).ids
        self.encode(sample[: 3 * self.PIECE_CHARS + 17])
        resumed = self.encode(sample)
        self.entries.clear()
        self.tokens = 0
        return resumed == whole


@dataclass(frozen=True)
class ModelTokenizer:
    tokenizer: Tokenizer
    template: jinja2.Template | None
    specials: Mapping[str, str]
    prefixes: TokenPrefixes | None = None  # None: this tokenizer is read whole every time

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
        prefixes = TokenPrefixes(tokenizer)
        return cls(tokenizer, template, specials, prefixes if prefixes.works() else None)

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
        if not special and self.prefixes is not None:
            ids = self.prefixes.encode(text[:cap])
        else:
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

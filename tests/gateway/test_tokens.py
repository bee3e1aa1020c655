"""A prompt read into a vLLM engine's tokens in the gateway (controlplane.gateway.tokens),
on the tiny checkpoint. That the ids are vLLM's own is checked against vLLM itself in
tests/e2e/test_routing_vllm.py; here, what each kind of request reads as, and what is
not read (None), never an exception."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, normalizers

from controlplane.gateway.apis import Api
from controlplane.gateway.tokens import ModelTokenizer, TokenPrefixes
from nodeagent import tinymodel
from nodeagent.kvevents import TOKENIZER_FILES


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("tiny"))


def files_of(directory: Path, **changed: bytes) -> dict[str, bytes]:
    files = {n: (directory / n).read_bytes() for n in TOKENIZER_FILES if (directory / n).exists()}
    return files | changed


@pytest.fixture(scope="module")
def tiny(checkpoint: Path) -> ModelTokenizer:
    return ModelTokenizer.load(files_of(checkpoint))


CHAT = [{"role": "system", "content": "The quick brown fox."}, {"role": "user", "content": "q?"}]


def test_a_chat_is_its_template_rendered_then_tokenized_without_special_tokens(tiny):
    ids = tiny.ids(Api.CHAT, {"messages": CHAT}, 65536)
    text = "<s><|system|>\nThe quick brown fox.\n<|user|>\nq?\n<|assistant|>\n"
    assert ids == tiny.tokenizer.encode(text, add_special_tokens=False).ids


def test_text_parts_read_as_vllm_joins_them(tiny):
    parts = [{"type": "text", "text": "The quick"}, {"type": "text", "text": "brown fox."}]
    ids = tiny.ids(Api.CHAT, {"messages": [{"role": "user", "content": parts}]}, 65536)
    one = [{"role": "user", "content": "The quick\nbrown fox."}]
    joined = tiny.ids(Api.CHAT, {"messages": one}, 65536)
    assert ids == joined


def test_a_completion_is_its_prompt_tokenized_and_token_ids_are_themselves(tiny):
    ids = tiny.ids(Api.COMPLETIONS, {"prompt": "The quick brown fox."}, 65536)
    assert ids == tiny.tokenizer.encode("The quick brown fox.").ids
    assert tiny.ids(Api.COMPLETIONS, {"prompt": [5, 6, 7]}, 65536) == [5, 6, 7]


def test_a_responses_request_reads_as_the_chat_vllm_makes_of_it(tiny):
    ids = tiny.ids(Api.RESPONSES, {"instructions": "The quick brown fox.", "input": "q?"}, 65536)
    assert ids == tiny.ids(Api.CHAT, {"messages": CHAT}, 65536)


@pytest.mark.parametrize(
    ("api", "body"),
    [
        (Api.CHAT, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
        (Api.CHAT, {"messages": "no"}),
        (Api.CHAT, {"messages": [{"content": "no role"}]}),
        (Api.CHAT, {"messages": [{"role": "user", "content": 7}]}),
        (Api.COMPLETIONS, {"prompt": ["a batch", "of prompts"]}),
        (Api.RESPONSES, {"input": [{"type": "function_call_output", "output": "x"}]}),
        (Api.EMBEDDINGS, {"input": "x"}),
    ],
)  # fmt: skip
def test_what_it_cannot_read_as_the_engine_does_is_none(tiny, api, body):
    assert tiny.ids(api, body, 65536) is None


def test_a_template_that_raises_reads_as_none(checkpoint):
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('no system messages') }}"
    strict = ModelTokenizer.load(files_of(checkpoint, **{
        "tokenizer_config.json": json.dumps(config).encode()}))  # fmt: skip
    assert strict.ids(Api.CHAT, {"messages": CHAT}, 65536) is None


def test_named_templates_generation_tags_and_a_template_file(checkpoint):
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{% for m in messages %}{% generation %}"
                                        "{{ m['content'] | tojson }}{% endgeneration %}"
                                        "{% endfor %}"},
    ]  # fmt: skip
    named = ModelTokenizer.load(files_of(checkpoint, **{
        "tokenizer_config.json": json.dumps(config).encode()}))  # fmt: skip
    ids = named.ids(Api.CHAT, {"messages": [{"role": "user", "content": "fox"}]}, 65536)
    assert ids == named.tokenizer.encode('"fox"', add_special_tokens=False).ids
    filed = ModelTokenizer.load(
        files_of(checkpoint, **{"chat_template.jinja": b"[{{ bos_token }}]"})
    )
    ids = filed.ids(Api.CHAT, {"messages": CHAT}, 65536)
    assert ids == filed.tokenizer.encode("[<s>]", add_special_tokens=False).ids


def test_a_huge_prompt_is_read_up_to_the_cap(tiny):
    ids = tiny.ids(Api.CHAT, {"messages": [{"role": "user", "content": "fox " * 250_000}]}, 4096)
    assert ids is not None
    assert 0 < len(ids) <= 4096


@pytest.mark.parametrize(
    "files",
    [{}, {"tokenizer.json": b"not json"}, {"tokenizer.json": b"\xff\xfe"}],
)
def test_files_it_cannot_read_are_a_value_error(files):
    with pytest.raises(ValueError, match="tokenizer"):
        ModelTokenizer.load(files)


def test_a_prompt_that_starts_as_an_earlier_one_reads_as_it_does_whole(tiny):
    """Tokenized from where a kept piece ends, a text reads exactly as it does whole: shared
    prefixes, cuts anywhere, odd whitespace and unicode."""
    prefixes = TokenPrefixes(tiny.tokenizer)
    rng = random.Random(3)
    alphabet = [*"abcdefghij ABC  .,!?\n\t0123456789éü😀-'\"", " the", "  ", "\n\n", " 's"]
    bases = ["".join(rng.choice(alphabet) for _ in range(rng.randint(200, 3000)))
             for _ in range(6)]  # fmt: skip
    for _ in range(120):
        base = rng.choice(bases)
        text = base[: rng.randint(0, len(base))] + "".join(
            rng.choice(alphabet) for _ in range(rng.randint(0, 600))
        )
        assert prefixes.encode(text) == tiny.tokenizer.encode(text, add_special_tokens=False).ids
    assert prefixes.entries  # it did keep pieces


def test_kept_pieces_are_bounded_and_a_broken_chain_is_not_used(tiny, monkeypatch):
    monkeypatch.setattr(TokenPrefixes, "MAX_TOKENS", 500)
    prefixes = TokenPrefixes(tiny.tokenizer)
    text = " ".join(f"the quick brown fox {n}" for n in range(400))
    whole = tiny.tokenizer.encode(text, add_special_tokens=False).ids
    assert prefixes.encode(text) == whole
    assert prefixes.tokens <= 500
    assert sum(len(entry[2]) for entry in prefixes.entries.values()) == prefixes.tokens
    assert prefixes.encode(text) == whole  # its first pieces are gone: read whole again


def test_a_tokenizer_that_merges_across_words_gets_no_kept_pieces(checkpoint):
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.normalizer = normalizers.Prepend("#")  # each encode's text starts differently
    assert not TokenPrefixes(tokenizer).works()
    files = files_of(checkpoint, **{"tokenizer.json": tokenizer.to_str().encode()})
    assert ModelTokenizer.load(files).prefixes is None

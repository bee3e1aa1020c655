from __future__ import annotations

import hashlib
import json

from safetensors.numpy import load_file
from tokenizers import Tokenizer

from nodeagent import tinymodel


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_the_checkpoint_is_a_small_llama_with_a_chat_template(tmp_path):
    directory = tinymodel.build(tmp_path / "tiny")
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # vLLM's CPU attention supports head size 64, not 16.
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    weights = load_file(directory / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (
        config["vocab_size"],
        config["hidden_size"],
    )
    assert (
        len([name for name in weights if name.startswith("model.layers.")])
        == 9 * config["num_hidden_layers"]
    )
    assert sum(p.stat().st_size for p in directory.iterdir()) < 3_000_000

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == config["vocab_size"] <= 512
    assert tokenizer.decode(tokenizer.encode("Hello, fleet!").ids) == "Hello, fleet!"
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    assert "add_generation_prompt" in settings["chat_template"]


def test_the_same_seed_gives_the_same_bytes(tmp_path):
    assert digest(tinymodel.build(tmp_path / "a")) == digest(tinymodel.build(tmp_path / "b"))
    assert digest(tinymodel.build(tmp_path / "c", seed=1)) != digest(tmp_path / "a")


def test_the_command_line(tmp_path, capsys):
    assert tinymodel.main([str(tmp_path / "out")]) == 0
    assert "tiny Llama checkpoint" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").exists()

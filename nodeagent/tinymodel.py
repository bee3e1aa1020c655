"""`python -m nodeagent.tinymodel DIR`: a tiny Llama checkpoint built offline, for tests and demos.

A byte-level BPE tokenizer trained on text shipped in this file (with a chat
template) and seeded random weights of a 2-layer `LlamaForCausalLM` (hidden
128, 2 heads of 64, a head size vLLM's CPU attention supports), saved as
safetensors: about 2 MB. Needs `tokenizers`, `safetensors` and numpy, not
torch. The same arguments give the same bytes, so a rebuilt model has the same
sha256 as before. The output is noise: ask with `ignore_eos` for exact lengths.

`--adapter` writes a LoRA adapter of that checkpoint instead (PEFT's layout:
adapter_config.json and adapter_model.safetensors, rank 8 on the attention's q
and v projections, seeded weights), which vLLM loads at run time: its answers
differ from the base's, deterministically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """
A serverless control plane routes each request to a host that serves the model.
When no host serves it, the model is loaded on the host that can be ready soonest.
Idle models step down from the GPU to host memory, then to the local disk, then away.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Hello, world. What is the capital of France? Paris is the capital of France.
Tokens stream back as the engine produces them, one chunk at a time, until done.
user assistant system: you are a helpful assistant. Answer briefly and kindly.
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > | \\ " ' , . ; : ? !
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.strip().splitlines() if line]
    tokenizer.train_from_iterator(lines * 20, trainer)
    return tokenizer


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def llama_weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[f"{prefix}.self_attn.{name}.weight"] = normal(hidden, hidden)
        weights[f"{prefix}.mlp.gate_proj.weight"] = normal(inner, hidden)
        weights[f"{prefix}.mlp.up_proj.weight"] = normal(inner, hidden)
        weights[f"{prefix}.mlp.down_proj.weight"] = normal(hidden, inner)
        weights[f"{prefix}.input_layernorm.weight"] = np.ones(hidden, np.float32)
        weights[f"{prefix}.post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    weights["lm_head.weight"] = normal(vocab, hidden)
    return weights


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build(
    directory: Path, *, vocab_size: int = 512, hidden: int = 128, layers: int = 2, seed: int = 0
) -> Path:
    """Write the checkpoint into `directory` (created if needed) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = llama_config(tokenizer.get_vocab_size(), hidden, layers, heads=2)
    write_json(directory / "config.json", config)
    write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "model_max_length": config["max_position_embeddings"],
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
        },
    )
    write_json(
        directory / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    )
    write_json(
        directory / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    )
    save_file(
        llama_weights(config, seed), str(directory / "model.safetensors"), metadata={"format": "pt"}
    )
    return directory


ADAPTER_MODULES = ("q_proj", "v_proj")


def build_adapter(
    directory: Path, *, rank: int = 8, seed: int = 1, hidden: int = 128, layers: int = 2
) -> Path:
    """Write a LoRA adapter of the tiny checkpoint (`build`'s defaults) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(layers):
        for module in ADAPTER_MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            weights[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, hidden)) * 0.1).astype(
                np.float32
            )
            # Non-zero B (PEFT starts it at zero): the adapter changes what the model says.
            weights[f"{prefix}.lora_B.weight"] = (rng.standard_normal((hidden, rank)) * 0.1).astype(
                np.float32
            )
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(
        directory / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": 2 * rank,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": list(ADAPTER_MODULES),
            "modules_to_save": None,
            "base_model_name_or_path": "llmfleet/tiny",
            "inference_mode": True,
        },
    )
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nodeagent.tinymodel", description=__doc__.splitlines()[0]
    )
    parser.add_argument("directory", type=Path, help="where to write the checkpoint")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights (default 0)"
    )
    parser.add_argument(
        "--adapter", action="store_true", help="write a LoRA adapter of the checkpoint instead"
    )
    parser.add_argument("--rank", type=int, default=8, help="the adapter's rank (default 8)")
    args = parser.parse_args(argv)
    if args.adapter:
        path = build_adapter(args.directory, rank=args.rank, seed=args.seed)
        what = f"LoRA adapter (rank {args.rank}) of the tiny checkpoint"
    else:
        path = build(args.directory, seed=args.seed)
        what = "tiny Llama checkpoint"
    size = sum(file.stat().st_size for file in path.iterdir())
    print(f"{what} in {path} ({size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

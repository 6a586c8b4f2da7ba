"""Make a tiny, complete, random-weight Qwen2 model directory offline (for tests, demos and benchmarks).

The directory is what `transformers` expects from the hub: `config.json` (model_type qwen2),
`model.safetensors`, and a byte-level BPE tokenizer trained on the spot with the `tokenizers` library,
saved with Qwen's special tokens and chat template. Both `AutoTokenizer.from_pretrained` and
`Qwen2ForCausalLM.from_pretrained` load it with no network. config.json carries
`"actfleet_random_weights": true` so reports and shard metadata can say the numbers mean nothing.

    python -m actfleet.demo.tiny_model OUT_DIR [--layers 2 --hidden 64 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's template, minus tool calling: a default system turn, then <|im_start|>role\n...<|im_end|>\n turns.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A little built-in text so the BPE learns some merges (digits, grid punctuation, common English).
_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A transformer reads tokens and writes activations.
Activations are stored in shards; every shard holds token ids, sample ids, positions and one tensor per site.
Example 1 input 3x3:
0: 0 1 2
1: 3 4 5
2: 6 7 8
output 3x3:
0: 8 7 6
1: 5 4 3
2: 2 1 0
user assistant system You are a helpful assistant. What is the answer? The answer is 42.
"""


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[],  # added after training so they get the ids just above the BPE vocab, like Qwen
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def make_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 320,
    tie: bool = True,
    max_pos: int = 2048,
    rope_theta: float = 1_000_000.0,
    rms_norm_eps: float = 1e-6,
    init_std: float = 0.02,
) -> Path:
    """Write a random-weight Qwen2 model dir at `path` and return it.

    `vocab` is the embedding size; the tokenizer gets up to `vocab - 3` BPE tokens plus the three special
    tokens (at least the 256 byte tokens, so `vocab` must be >= 259). Weights are N(0, init_std) with
    biases and norm weights also random, so parity tests exercise every parameter.
    """
    from safetensors.numpy import save_file
    from transformers import PreTrainedTokenizerFast

    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}), heads by kv_heads ({kv_heads})")
    if vocab < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab must be at least {256 + len(SPECIAL_TOKENS)} (byte-level tokens + specials)")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(vocab - len(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=max_pos,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    assert tok.get_vocab_size() <= vocab

    head_dim = hidden // heads
    endoftext = tok.token_to_id("<|endoftext|>")
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": tie,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "initializer_range": init_std,
        "bos_token_id": endoftext,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "pad_token_id": endoftext,
        "torch_dtype": "float32",
        "use_cache": True,
        "actfleet_random_weights": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (rng.standard_normal(shape) * init_std).astype(np.float32)

    def norm_weight(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    weights = {"model.embed_tokens.weight": (rng.standard_normal((vocab, hidden)) * 1.0).astype(np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "input_layernorm.weight": norm_weight(hidden),
                p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
                p + "self_attn.q_proj.bias": normal(heads * head_dim),
                p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
                p + "self_attn.k_proj.bias": normal(kv_heads * head_dim),
                p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.bias": normal(kv_heads * head_dim),
                p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
                p + "post_attention_layernorm.weight": norm_weight(hidden),
                p + "mlp.gate_proj.weight": normal(intermediate, hidden),
                p + "mlp.up_proj.weight": normal(intermediate, hidden),
                p + "mlp.down_proj.weight": normal(hidden, intermediate),
            }
        )
    weights["model.norm.weight"] = norm_weight(hidden)
    if not tie:
        weights["lm_head.weight"] = normal(vocab, hidden)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m actfleet.demo.tiny_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=320)
    parser.add_argument("--untied", action="store_true", help="separate lm_head weights")
    parser.add_argument("--max-pos", type=int, default=2048)
    a = parser.parse_args(argv)
    out = make_tiny_model(
        a.out,
        seed=a.seed,
        layers=a.layers,
        hidden=a.hidden,
        heads=a.heads,
        kv_heads=a.kv_heads,
        intermediate=a.intermediate,
        vocab=a.vocab,
        tie=not a.untied,
        max_pos=a.max_pos,
    )
    print(out)


if __name__ == "__main__":
    main()

"""Hugging Face Llama format, both ways: a directory that ``transformers`` loads as
``LlamaForCausalLM`` and ``PreTrainedTokenizerFast`` with no code of ours, and back.

What the directory holds (``save_llama_dir``):

- ``config.json``: LlamaConfig fields (sizes, heads, ``rope_theta``, ``rms_norm_eps``,
  ``max_position_embeddings`` = our context length, ``tie_word_embeddings: false``, bos/eos ids).
- ``model.safetensors``: our weights under Llama's names, fp32 unless asked otherwise.
- ``generation_config.json``: bos/eos/pad ids and the run's sampling settings.
- ``tokenizer.json`` (byte-level BPE: our vocab and merges, GPT-2's pretokenizer pattern, the
  special tokens as added tokens) and ``tokenizer_config.json``.

The one real difference is RoPE's pair layout. We rotate adjacent pairs (2i, 2i+1) of each head;
Llama rotates (i, i + D/2) (``rotate_half``). Both use angle p * theta^(-2i/D) for pair i, so a
fixed permutation of each head's q and k projection rows converts one into the other: Llama's
row i is our row 2i, its row i + D/2 our row 2i + 1. q.k is then the same number, and v, the
output projection and everything else keep their layout.

Reading (``load_llama_dir``) accepts any Llama directory whose settings this model can express
and refuses, naming the field, anything else (grouped-query attention, rope scaling, biases, ...).
``transformers`` is never imported here: the files are plain JSON and safetensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from tokenizer.pretokenize import GPT2_PATTERN
from tokenizer.tokenizer import Tokenizer, from_printable, to_printable

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --- model configuration --------------------------------------------------------------------


def llama_incompatibility(cfg: ModelConfig) -> str | None:
    """Why Llama cannot express this model (the setting that prevents it), or None when it can."""
    if not cfg.use_rmsnorm:
        return "--no-use-rmsnorm: Llama has an RMSNorm before every sub-layer and at the end"
    if cfg.post_norm:
        return "--post-norm: Llama is pre-norm (the norm before each sub-layer, not after the residual add)"
    if not cfg.use_rope:
        return "--no-use-rope (NoPE): Llama always applies RoPE to q and k"
    if cfg.ffn != "swiglu":
        return f"--ffn {cfg.ffn}: Llama's feed-forward is SwiGLU (gate, up and down projections)"
    return None


def llama_config(cfg: ModelConfig, bos_id: int | None, eos_id: int | None, dtype: str = "fp32") -> dict:
    """config.json of a ``LlamaForCausalLM`` with ``cfg``'s shape.

    ``rope_theta`` and ``rope_scaling: null`` are the keys every Llama reader knows (transformers
    4.x, vLLM, llama.cpp's converter); transformers 5 reads them into its ``rope_parameters``."""
    why = llama_incompatibility(cfg)
    if why is not None:
        raise ValueError(f"this model cannot be written as a Llama: {why}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,  # pad = eos, as in generation_config.json
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[DTYPES[dtype]],
    }


def model_config_from_llama(config: dict, source: str | os.PathLike = CONFIG) -> ModelConfig:
    """The ModelConfig of a Llama config.json; ValueError naming the field this model cannot follow."""

    def refuse(name: str, why: str) -> ValueError:
        return ValueError(f"{source}: {name} = {json.dumps(config.get(name))}: {why}")

    model_type = config.get("model_type")
    if model_type != "llama":
        raise refuse("model_type", 'only Llama-architecture models (model_type "llama") can be read')
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(name), int):
            raise refuse(name, "missing or not an integer")
    heads, width = config["num_attention_heads"], config["hidden_size"]
    if config.get("num_key_value_heads") not in (None, heads):
        raise refuse("num_key_value_heads", f"grouped-query attention is not supported (needs {heads}, one per head)")
    if width % heads or config.get("head_dim") not in (None, width // heads):
        raise refuse("head_dim", f"must be hidden_size / num_attention_heads = {width / heads:g}")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise refuse("hidden_act", "the feed-forward here is SwiGLU with SiLU")
    for name in ("attention_bias", "mlp_bias"):
        if config.get(name):
            raise refuse(name, "this model's projections have no biases")
    if config.get("attention_dropout", 0.0) not in (0, 0.0, None):
        raise refuse("attention_dropout", "this model has no dropout")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("partial_rotary_factor", "RoPE here rotates the whole head")
    rope_theta = config.get("rope_theta", 10_000.0)
    for name in ("rope_scaling", "rope_parameters"):
        rope = config.get(name)
        if rope is None:
            continue
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise refuse(name, 'only plain RoPE (rope_type "default") is supported, no scaling')
        if set(rope) - {"rope_type", "type", "rope_theta"}:
            raise refuse(name, 'only plain RoPE (rope_type "default") is supported, no scaling')
        rope_theta = rope.get("rope_theta", rope_theta)
    try:
        return ModelConfig(
            vocab_size=config["vocab_size"],
            context_length=config.get("max_position_embeddings", 2048),
            d_model=width,
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            d_ff=config["intermediate_size"],
            rope_theta=float(rope_theta),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_llama_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a Llama directory's config.json (what ``--init-from DIR`` trains)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    return model_config_from_llama(_read_json(Path(directory) / CONFIG), Path(directory) / CONFIG)


# Model settings a run started from a Llama directory may still choose: RoPE has no table, so the
# weights serve any sequence length.
FREE_ON_INIT = ("context_length",)


def init_model_config(directory: str | os.PathLike, given: dict) -> ModelConfig:
    """The model of a run started ``--init-from directory``: its config.json's, with ``given``
    (model settings named on the command line or in a config file) applied where they are free to
    differ (``FREE_ON_INIT``); any other given setting must equal the directory's."""
    cfg = read_llama_config(directory).to_dict()
    free = ["--" + name.replace("_", "-") for name in FREE_ON_INIT]
    for name, value in given.items():
        if name in FREE_ON_INIT:
            cfg[name] = value
        elif cfg[name] != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {value!r} differs from {Path(directory) / CONFIG}'s {cfg[name]!r}: a run started "
                f"--init-from takes the model from there (only {', '.join(free)} may change)"
            )
    return ModelConfig(**cfg)


# --- weights ----------------------------------------------------------------------------------


def rope_rows_to_llama(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q or k projection (H*D, d_in) from our pair layout (2i, 2i+1) to Llama's (i, i + D/2).

    Per head, rows [0, 1, 2, 3, 4, 5] become [0, 2, 4, 1, 3, 5]."""
    out, d_in = w.shape
    return w.reshape(num_heads, out // num_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in).contiguous()


def rope_rows_from_llama(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of ``rope_rows_to_llama``: per head, rows [0, 2, 4, 1, 3, 5] back to [0, ..., 5]."""
    out, d_in = w.shape
    return w.reshape(num_heads, 2, out // num_heads // 2, d_in).transpose(1, 2).reshape(out, d_in).contiguous()


def _name_map(num_layers: int) -> dict[str, str]:
    """Our state_dict key -> Llama's."""
    names = {
        "token_embeddings.weight": "model.embed_tokens.weight",
        "ln_final.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    per_layer = {
        "ln1.weight": "input_layernorm.weight",
        "attn.q_proj.weight": "self_attn.q_proj.weight",
        "attn.k_proj.weight": "self_attn.k_proj.weight",
        "attn.v_proj.weight": "self_attn.v_proj.weight",
        "attn.output_proj.weight": "self_attn.o_proj.weight",
        "ln2.weight": "post_attention_layernorm.weight",
        "ffn.w1.weight": "mlp.gate_proj.weight",
        "ffn.w3.weight": "mlp.up_proj.weight",
        "ffn.w2.weight": "mlp.down_proj.weight",
    }
    for i in range(num_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in per_layer.items()})
    return names


def _is_rope_projection(key: str) -> bool:
    return key.endswith(("attn.q_proj.weight", "attn.k_proj.weight"))


def to_llama_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, dtype: str = "fp32"
) -> dict[str, torch.Tensor]:
    """Our state_dict -> Llama's names and q/k row layout, on the CPU in ``dtype``."""
    names = _name_map(cfg.num_layers)
    if set(state_dict) != set(names):
        missing, extra = sorted(set(names) - set(state_dict)), sorted(set(state_dict) - set(names))
        raise ValueError(f"state dict does not match the model config: missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for key, theirs in names.items():
        w = state_dict[key].detach().to("cpu", DTYPES[dtype])
        out[theirs] = rope_rows_to_llama(w, cfg.num_heads) if _is_rope_projection(key) else w.contiguous()
    return out


def from_llama_state_dict(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str | os.PathLike = WEIGHTS
) -> dict[str, torch.Tensor]:
    """Llama's tensors -> our state_dict (q/k rows permuted back); a tied LM head is copied from the
    embedding. ValueError naming the missing or unexpected tensors."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer in old files
    names = _name_map(cfg.num_layers)
    if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # tie_word_embeddings
    wanted = set(names.values())
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        raise ValueError(
            f"{source}: tensors do not match config.json's Llama: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    return {
        ours: rope_rows_from_llama(tensors[theirs], cfg.num_heads) if _is_rope_projection(ours) else tensors[theirs]
        for ours, theirs in names.items()
    }


def read_llama_weights(directory: str | os.PathLike, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state_dict from a Llama directory's model.safetensors (or its sharded index)."""
    from safetensors.torch import load_file

    d = Path(directory)
    if (d / WEIGHTS).is_file():
        files = [d / WEIGHTS]
    elif (d / WEIGHTS_INDEX).is_file():
        files = [d / f for f in sorted(set(_read_json(d / WEIGHTS_INDEX).get("weight_map", {}).values()))]
    else:
        raise FileNotFoundError(f"{d}: no {WEIGHTS} (nor {WEIGHTS_INDEX}); only safetensors weights are read")
    tensors = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weights file not found: {f}")
        tensors.update(load_file(f))
    return from_llama_state_dict(tensors, cfg, files[0] if len(files) == 1 else d / WEIGHTS_INDEX)


# --- tokenizer ---------------------------------------------------------------------------------


def _from_printable(s: str, source) -> bytes:
    try:
        return from_printable(s)
    except ValueError:
        raise ValueError(
            f"{source}: vocab entry {s!r} is not written in GPT-2's byte-to-unicode alphabet: not a byte-level BPE"
        ) from None


_BYTE_LEVEL = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def tokenizer_json(tok: Tokenizer) -> dict:
    """A ``tokenizers`` tokenizer.json equal to ``tok``: byte-level BPE with its merges, GPT-2's
    pretokenizer (ByteLevel with ``use_regex``: GPT-2's pattern, the one ``tok`` splits with), its
    special tokens as added tokens (never split, matched longest first, as ``tok.encode`` does)."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": tok.special_ids[s],
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for s in tok.special_tokens
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **_BYTE_LEVEL},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", **_BYTE_LEVEL},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {to_printable(b): i for i, b in sorted(tok.vocab.items())},
            "merges": [f"{to_printable(a)} {to_printable(b)}" for a, b in tok.merges],
        },
    }


def _check_byte_level(spec: dict, source) -> None:
    """Refuse, naming the part, a tokenizer.json that is not GPT-2-style byte-level BPE."""

    model = spec.get("model") or {}

    def refuse(part: str, why: str) -> ValueError:
        value = model.get(part.removeprefix("model.")) if part.startswith("model.") else spec.get(part)
        return ValueError(
            f"{source}: {part} = {json.dumps(value)}: {why}; "
            "only byte-level BPE tokenizers with GPT-2's pretokenizer can be read"
        )

    if model.get("type") != "BPE":
        raise refuse("model.type", "not a BPE model")
    if model.get("byte_fallback"):
        raise refuse("model.byte_fallback", "a sentencepiece-style BPE, not a byte-level one")
    for part in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(part):
            raise refuse(f"model.{part}", "subword affixes are not byte-level BPE")
    if model.get("dropout"):
        raise refuse("model.dropout", "BPE dropout is not supported")
    if model.get("ignore_merges"):
        raise refuse("model.ignore_merges", "whole-word vocab lookups change the merges' result")
    if spec.get("normalizer") is not None:
        raise refuse("normalizer", "text normalization is not supported")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    gpt2_split = (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and (steps[0].get("pattern") or {}).get("Regex") == GPT2_PATTERN
        and steps[0].get("behavior") == "Isolated"
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    )
    plain = len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True)
    if not (gpt2_split or plain) or any(s.get("add_prefix_space") for s in steps):
        raise refuse("pre_tokenizer", "not GPT-2's byte-level pretokenizer")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise refuse("decoder", "not a byte-level decoder")
    if (spec.get("post_processor") or {"type": "ByteLevel"}).get("type") != "ByteLevel":
        raise refuse("post_processor", "it adds tokens to every encoding, which this tokenizer does not")


def tokenizer_from_json(spec: dict, source: str | os.PathLike = TOKENIZER) -> Tokenizer:
    """Our Tokenizer from a byte-level BPE tokenizer.json (ids kept); its added tokens become our
    special tokens. ValueError naming the part when it is not one."""
    _check_byte_level(spec, source)
    model = spec["model"]
    vocab = {int(i): _from_printable(s, source) for s, i in model.get("vocab", {}).items()}
    specials = []
    for added in spec.get("added_tokens", []):
        vocab[int(added["id"])] = added["content"].encode("utf-8")
        specials.append(added["content"])
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ") if isinstance(m, str) else m
        merges.append((_from_printable(a, source), _from_printable(b, source)))
    try:
        return Tokenizer(vocab, merges, specials)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_llama_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Our Tokenizer from a Llama directory's tokenizer.json."""
    path = Path(directory) / TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {TOKENIZER} (only byte-level BPE tokenizer.json files are read)")
    return tokenizer_from_json(_read_json(path), path)


def _tokenizer_config(tok: Tokenizer, stop_token: str | None, context_length: int) -> dict:
    added = tokenizer_json(tok)["added_tokens"]
    return {
        # The generic fast tokenizer loads tokenizer.json as it is (a named class may rebuild it).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": stop_token,
        "eos_token": stop_token,
        "pad_token": stop_token,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # Decoding gives back the exact text (no " ." -> "." clean-up).
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }


# --- the directory -----------------------------------------------------------------------------


def save_llama_dir(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    tok: Tokenizer,
    *,
    dtype: str = "fp32",
    stop_token: str | None = None,
    sampling: dict | None = None,
) -> Path:
    """Write a Hugging Face Llama directory (files in the module docstring) for our model.

    Arguments:
        cfg, state_dict: the model (its state_dict keys, any device and dtype).
        tok: its tokenizer; ``stop_token`` (one of its special tokens, default the first) becomes
            bos, eos and pad (documents are separated by it, so it also starts each one).
        dtype: "fp32", "bf16" or "fp16" for the weights.
        sampling: generation_config.json's sampling defaults (``temperature``, ``top_p``).
    Returns the directory. Nothing is written when the model cannot be a Llama.
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max(tok.vocab) >= cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has ids up to {max(tok.vocab)}, beyond the model's vocab_size {cfg.vocab_size}"
        )
    if stop_token is None and tok.special_tokens:
        stop_token = tok.special_tokens[0]
    if stop_token is not None and stop_token not in tok.special_ids:
        raise ValueError(f"stop token {stop_token!r} is not a special token of the tokenizer ({tok.special_tokens})")
    stop_id = tok.special_ids[stop_token] if stop_token is not None else None
    config = llama_config(cfg, stop_id, stop_id, dtype)
    tensors = to_llama_state_dict(state_dict, cfg, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generation = {"bos_token_id": stop_id, "eos_token_id": stop_id, "pad_token_id": stop_id}
    if sampling:
        generation.update({"do_sample": True, **sampling})
    _write_json(out / CONFIG, config)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    os.chmod(out / WEIGHTS, (out / CONFIG).stat().st_mode)  # safetensors creates it 0600: as config.json
    _write_json(out / GENERATION_CONFIG, generation)
    save_hf_tokenizer(out, tok, stop_token, cfg.context_length)
    return out


def save_hf_tokenizer(out_dir: str | os.PathLike, tok: Tokenizer, stop_token: str | None, max_length: int) -> Path:
    """tokenizer.json and tokenizer_config.json of ``tok`` (``AutoTokenizer.from_pretrained`` loads them);
    ``stop_token`` is bos, eos and pad, ``max_length`` the model's context."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / TOKENIZER, tokenizer_json(tok))
    _write_json(out / TOKENIZER_CONFIG, _tokenizer_config(tok, stop_token, max_length))
    return out


@dataclass
class LlamaDir:
    """What ``load_llama_dir`` reads: the model's config, its state_dict (our keys and layout) and
    its tokenizer."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def load_llama_dir(directory: str | os.PathLike) -> LlamaDir:
    """Read a Hugging Face Llama directory (ours or any this model can express) back into our terms.

    FileNotFoundError or ValueError naming the file and field that cannot be read."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    cfg = read_llama_config(d)
    tok = read_llama_tokenizer(d)
    if max(tok.vocab) >= cfg.vocab_size:
        raise ValueError(
            f"{d / TOKENIZER}: ids reach {max(tok.vocab)}, beyond config.json's vocab_size {cfg.vocab_size}"
        )
    return LlamaDir(cfg, read_llama_weights(d, cfg), tok)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)

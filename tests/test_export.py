"""Hugging Face Llama export and ``--init-from``: ``transformers`` loads what ``python -m train.export``
writes, computes our logits and greedy tokens, and tokenizes as our Tokenizer does; what Llama (or
this model) cannot express is refused by name."""

import json
from pathlib import Path

import pytest
import torch

from model import ModelConfig, TransformerLM
from tokenizer import Tokenizer
from train.cli import main as train_main
from train.decoding import generate
from train.export import main as export_main
from train.hf_llama import (
    load_llama_dir,
    model_config_from_llama,
    rope_rows_from_llama,
    rope_rows_to_llama,
    save_hf_tokenizer,
    save_llama_dir,
    tokenizer_from_json,
    tokenizer_json,
)

# Only the tests import it (the package never does); a machine without the test extra has no
# loader to check against.
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--quiet", "--kernels", "torch", "--device", "cpu"]
EOT = "<|endoftext|>"


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def byte_tokenizer(specials=(EOT,)) -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], list(specials))


def random_model(cfg: ModelConfig) -> TransformerLM:
    m = TransformerLM(cfg)
    with torch.no_grad():  # norm gains away from 1, so a swapped or missing norm shows
        for name, p in m.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                p.uniform_(0.5, 1.5)
    return m


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=260, context_length=24, d_model=48, num_layers=2, num_heads=4, d_ff=80, rope_theta=500.0)
    return ModelConfig(**{**base, **kw})


def test_rope_row_permutation_worked_example():
    # One head of width 6, input width 1: row j holds j. Llama's rows (i, i + 3) are our (2i, 2i + 1).
    w = torch.arange(12.0).reshape(12, 1)  # two heads
    assert rope_rows_to_llama(w, 2).flatten().tolist() == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]
    assert torch.equal(rope_rows_from_llama(rope_rows_to_llama(w, 2), 2), w)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_random_model_logits_equal_ours(tmp_path, kernels):
    cfg = tiny_config(norm_eps=1e-6)
    ours = random_model(cfg)
    save_llama_dir(tmp_path / "hf", cfg, ours.state_dict(), byte_tokenizer())
    theirs = hf_model(tmp_path / "hf")
    fused = TransformerLM(cfg, kernels=kernels)
    fused.load_state_dict(ours.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 13))  # not a multiple of any block
    with torch.no_grad():
        assert rel_err(theirs(x).logits, fused(x)) <= 1e-5


def test_random_model_greedy_generation_equals_ours(tmp_path):
    cfg = tiny_config()
    ours = random_model(cfg)
    save_llama_dir(tmp_path / "hf", cfg, ours.state_dict(), byte_tokenizer())
    theirs = hf_model(tmp_path / "hf")
    prompt = [5, 17, 200, 3]
    mine = generate(ours, [prompt], max_new_tokens=12, temperature=0.0)[0]
    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert out[0, len(prompt) :].tolist() == mine


def test_round_trip_through_files_is_bit_exact(tmp_path):
    cfg = tiny_config(norm_eps=3e-6, rope_theta=12345.0)
    ours = random_model(cfg)
    save_llama_dir(tmp_path / "hf", cfg, ours.state_dict(), byte_tokenizer(["<|endoftext|>", "<|pad|>"]))
    back = load_llama_dir(tmp_path / "hf")
    assert back.config == cfg
    sd = ours.state_dict()
    assert set(back.state_dict) == set(sd) and all(torch.equal(back.state_dict[k], sd[k]) for k in sd)
    assert back.tokenizer.special_tokens == ["<|endoftext|>", "<|pad|>"] and back.tokenizer.vocab[257] == b"<|pad|>"


def test_bf16_export_loads_in_bf16(tmp_path):
    cfg = tiny_config()
    ours = random_model(cfg)
    save_llama_dir(tmp_path / "hf", cfg, ours.state_dict(), byte_tokenizer(), dtype="bf16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert theirs.dtype == torch.bfloat16
    w = ours.state_dict()["lm_head.weight"].to(torch.bfloat16)
    assert torch.equal(theirs.lm_head.weight, w)


# --- the smoke preset, trained a few steps, exported by the CLI ---------------------------------


@pytest.fixture(scope="module")
def smoke_export(tmp_path_factory, shared_data):
    """A smoke-preset run of a few steps on corpus.en, exported with ``python -m train.export --run``."""
    d = tmp_path_factory.mktemp("smoke")
    args = SMOKE + ["--train-text", str(shared_data / "corpus.en"), "--data-dir", str(d / "data")]
    args += ["--out-dir", str(d / "runs"), "--run-name", "r", "--max-steps", "40", "--eval-interval", "40"]
    args += ["--log-interval", "1", "--sample-tokens", "0", "--checkpoint-interval", "40"]
    assert train_main(args) == 0
    run = d / "runs" / "r"
    assert export_main(["--run", str(run), "--out", str(d / "hf")]) == 0
    state = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], map_location="cpu", weights_only=False)
    ours = TransformerLM(ModelConfig(**state["model_config"]))
    ours.load_state_dict(state["model"])
    return d / "hf", ours, Tokenizer.load(run / "tokenizer")


@pytest.mark.slow
def test_exported_directory_has_the_llama_files(smoke_export):
    hf, ours, tok = smoke_export
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((hf / "config.json").read_text())
    c = ours.config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (
        c.d_model,
        c.num_layers,
        c.num_heads,
    )
    assert config["intermediate_size"] == c.d_ff and config["max_position_embeddings"] == c.context_length
    assert config["rope_theta"] == c.rope_theta and config["rms_norm_eps"] == c.norm_eps
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == c.num_heads
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == tok.special_ids[EOT]
    assert len({p.stat().st_mode for p in hf.iterdir()}) == 1  # the weights as readable as the JSON files
    generation = json.loads((hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.special_ids[EOT] and generation["temperature"] == 0.8


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_smoke_export_logits_equal_ours(smoke_export, kernels):
    hf, ours, tok = smoke_export
    theirs = hf_model(hf)
    mine = TransformerLM(ours.config, kernels=kernels)
    mine.load_state_dict(ours.state_dict())
    x = torch.tensor([tok.encode("Once upon a time, there was a little dog.")[: ours.config.context_length]])
    with torch.no_grad():
        assert rel_err(theirs(x).logits, mine(x)) <= 1e-5


@pytest.mark.slow
def test_smoke_export_greedy_generation_equals_train_generate(smoke_export):
    hf, ours, tok = smoke_export
    theirs = hf_model(hf)
    prompt = tok.encode("The history of")
    eot = tok.special_ids[EOT]
    mine = generate(ours, [prompt], max_new_tokens=20, temperature=0.0, stop_token=eot)[0]
    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)  # eos from the files
    assert out[0, len(prompt) :].tolist() == mine


@pytest.mark.slow
def test_auto_tokenizer_gives_our_ids(smoke_export, shared_data):
    hf, _, tok = smoke_export
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    assert auto.eos_token == EOT and auto.eos_token_id == tok.special_ids[EOT]
    for name in ("corpus.en", "tinystories_sample.txt"):  # the second has <|endoftext|> between stories
        text = (shared_data / name).read_text(encoding="utf-8")
        ids = auto(text)["input_ids"]
        assert ids == tok.encode(text)
        assert auto.decode(ids) == text
    assert tok.special_ids[EOT] in auto(f"a{EOT}{EOT}b")["input_ids"]


def test_auto_tokenizer_gives_gpt2_ids(tmp_path, shared_data):
    # A large merge table (50k merges) and text far from the training corpus.
    d = shared_data
    tok = Tokenizer.from_files(d / "gpt2_vocab.json", d / "gpt2_merges.txt", [EOT])
    save_hf_tokenizer(tmp_path, tok, EOT, 1024)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = (d / "novels100.txt").open(encoding="utf-8").read(300_000) + " é ü 日本語 🙂\t\n  x's 'll 12345 "
    assert auto(text)["input_ids"] == tok.encode(text)
    back = tokenizer_from_json(tokenizer_json(tok))
    assert back.vocab == tok.vocab and back.merges == tok.merges and back.special_tokens == [EOT]


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(post_norm=True), "--post-norm"),
        (dict(use_rmsnorm=False), "--no-use-rmsnorm"),
        (dict(use_rope=False), "--no-use-rope (NoPE)"),
        (dict(ffn="silu", d_ff=192), "--ffn silu"),
    ],
)
def test_models_llama_cannot_express_are_refused(tmp_path, setting, message):
    cfg = tiny_config(**setting)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        save_llama_dir(tmp_path / "hf", cfg, TransformerLM(cfg).state_dict(), byte_tokenizer())
    assert not (tmp_path / "hf").exists()


def test_export_cli_refusal_is_one_line(tmp_path, capsys):
    from train.checkpoint import save_checkpoint

    cfg = tiny_config(post_norm=True)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    byte_tokenizer().save(tmp_path / "run" / "tokenizer")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001.pt"
    save_checkpoint(TransformerLM(cfg), None, 1, ckpt, tokenizer_dir="../tokenizer")
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot export {ckpt}") and "--post-norm" in err and "\n" not in err
    assert export_main(["--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")]) == 1
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "a_file")]) == 1
    assert "--out is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "empty")])
        == 1
    )
    assert f"--tokenizer {tmp_path / 'empty'} holds no vocab.json" in capsys.readouterr().err


LLAMA = {
    "model_type": "llama",
    "vocab_size": 260,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
}


def test_foreign_llama_config_is_read():
    cfg = model_config_from_llama({**LLAMA, "rope_scaling": None, "rope_parameters": {"rope_type": "default"}})
    assert (cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.context_length) == (48, 4, 80, 64)
    v5 = {k: v for k, v in LLAMA.items() if k != "rope_theta"} | {"rope_parameters": {"rope_theta": 5e5}}
    assert model_config_from_llama(v5).rope_theta == 5e5


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 16}, "head_dim"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
    ],
)
def test_unsupported_llama_settings_are_refused_by_name(change, field):
    with pytest.raises(ValueError, match=f"config.json: {field} = "):
        model_config_from_llama({**LLAMA, **change})


@pytest.mark.parametrize(
    "change, part",
    [
        (lambda t: t["model"].update(type="WordPiece"), "model.type"),
        (lambda t: t["model"].update(byte_fallback=True), "model.byte_fallback"),
        (lambda t: t["model"].update(ignore_merges=True), "model.ignore_merges"),
        (lambda t: t.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda t: t.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "pre_tokenizer"),
        (  # Llama 3's pattern: digits in threes, case-insensitive contractions
            lambda t: t.update(
                pre_tokenizer={
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t)|\p{N}{1,3}"}, "behavior": "Isolated"},
                        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
                    ],
                }
            ),
            "pre_tokenizer",
        ),
        (lambda t: t.update(decoder={"type": "Metaspace"}), "decoder"),
        (lambda t: t.update(post_processor={"type": "TemplateProcessing"}), "post_processor"),
    ],
)
def test_non_byte_level_tokenizers_are_refused_by_name(change, part):
    spec = tokenizer_json(byte_tokenizer())
    change(spec)
    with pytest.raises(ValueError, match=f"tokenizer.json: {part} = .*only byte-level BPE"):
        tokenizer_from_json(spec)


def test_gpt2_split_pretokenizer_form_is_read():
    from tokenizer.pretokenize import GPT2_PATTERN

    spec = tokenizer_json(byte_tokenizer())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    assert tokenizer_from_json(spec).encode("hi<|endoftext|>") == [104, 105, 256]


def test_tied_embeddings_and_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_config()
    save_llama_dir(tmp_path, cfg, random_model(cfg).state_dict(), byte_tokenizer())
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    back = load_llama_dir(tmp_path)  # tie_word_embeddings: the head starts as the embedding
    assert torch.equal(back.state_dict["lm_head.weight"], tensors["model.embed_tokens.weight"])
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        load_llama_dir(tmp_path)


def test_package_never_imports_transformers():
    import ast

    found = [
        f"{p.relative_to(ROOT)}:{node.lineno}"
        for pkg in ("kernels", "model", "tokenizer", "train", "bench")
        for p in (ROOT / pkg).rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "transformers" for a in node.names))
        or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers")
    ]
    assert not found, found


@pytest.mark.parametrize("tied", [False, True])
def test_llama_written_by_transformers_is_read(tmp_path, tied):
    # A Llama that transformers itself wrote (its own config.json keys, its safetensors layout).
    config = transformers.LlamaConfig(
        vocab_size=260,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 700.0},
        tie_word_embeddings=tied,
    )
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path)
    save_hf_tokenizer(tmp_path, byte_tokenizer(), EOT, 32)
    back = load_llama_dir(tmp_path)
    assert (back.config.rope_theta, back.config.norm_eps, back.config.context_length) == (700.0, 1e-6, 32)
    ours = TransformerLM(back.config)
    ours.load_state_dict(back.state_dict)
    x = torch.randint(0, 260, (2, 11))
    with torch.no_grad():
        assert rel_err(theirs(x).logits, ours(x)) <= 1e-5


# --- python -m train --init-from DIR ---------------------------------------------------------


@pytest.mark.slow
def test_init_from_then_export_gives_identical_files(smoke_export, tmp_path, shared_data):
    hf, ours, tok = smoke_export
    # lr 0: one optimizer step that leaves every weight as it was, then the final checkpoint.
    args = SMOKE + ["--init-from", str(hf), "--train-text", str(shared_data / "corpus.en")]
    args += ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"), "--run-name", "again"]
    args += ["--max-steps", "1", "--lr", "0", "--min-lr", "0", "--sample-tokens", "0", "--eval-interval", "1"]
    assert train_main(args) == 0
    run = tmp_path / "runs" / "again"
    assert Tokenizer.load(run / "tokenizer").fingerprint() == tok.fingerprint()  # DIR's tokenizer, not a new BPE
    assert export_main(["--run", str(run), "--out", str(tmp_path / "hf2")]) == 0
    for f in sorted(hf.iterdir()):
        assert (tmp_path / "hf2" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.slow
def test_init_from_trains_from_the_weights(smoke_export, tmp_path, shared_data):
    hf, ours, tok = smoke_export
    args = SMOKE + ["--init-from", str(hf), "--train-text", str(shared_data / "corpus.en"), "--quiet"]
    args += ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"), "--run-name", "ft"]
    args += ["--max-steps", "2", "--log-interval", "1", "--sample-tokens", "0", "--eval-interval", "2"]
    assert train_main(args) == 0
    rows = metrics(tmp_path / "runs" / "ft")
    before = metrics(hf.parent / "runs" / "r")
    # The first step's loss is the exported model's (where the smoke run ended), not a fresh model's.
    assert rows[0]["train_loss"] < before[0]["train_loss"] - 0.5
    assert abs(rows[0]["train_loss"] - before[-1]["train_loss"]) < 0.3
    config = json.loads((tmp_path / "runs" / "ft" / "config.json").read_text())
    assert config["model"] == ours.config.to_dict() and config["run"]["init_from"] == str(hf.resolve())


@pytest.mark.slow
def test_init_from_takes_the_model_from_the_directory(smoke_export):
    from train.cli import resolve
    from train.errors import UserError

    hf, ours, _ = smoke_export
    _, cfg, run, _ = resolve(["--init-from", str(hf), "--preset", "tinystories"])
    assert cfg == ours.config and run.init_from == str(hf)
    _, cfg, _, _ = resolve(["--init-from", str(hf), "--context-length", "32"])
    assert cfg.context_length == 32 and cfg.d_model == ours.config.d_model
    with pytest.raises(ValueError, match="--d-model 128 differs from .*config.json's 64"):
        resolve(["--init-from", str(hf), "--d-model", "128"])
    with pytest.raises((UserError, FileNotFoundError), match="model directory not found"):
        resolve(["--init-from", str(hf.parent / "nowhere")])


@pytest.mark.slow
def test_tinystories_preset_shape_exports_and_generates_the_same(tmp_path):
    # The preset the README's goal names (vocab 10,000, d_model 512, 4 layers, 16 heads), random weights.
    from train.config import preset

    cfg, _ = preset("tinystories")
    ours = random_model(cfg)
    vocab = {i: bytes([i]) for i in range(256)} | {256 + i: f"<w{i}>".encode() for i in range(cfg.vocab_size - 257)}
    save_llama_dir(tmp_path, cfg, ours.state_dict(), Tokenizer(vocab, [], [EOT]), stop_token=EOT)
    theirs = hf_model(tmp_path)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert rel_err(theirs(prompt).logits, ours(prompt)) <= 1e-5
    mine = generate(ours, prompt, max_new_tokens=8, temperature=0.0, stop_token=cfg.vocab_size - 1)[0]
    out = theirs.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out[0, 9:].tolist() == mine

"""``python -m train.generate --checkpoint PATH --prompt "Once upon a time"``: sample from a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kernels import BACKENDS
from model import ModelConfig, TransformerLM
from train.checkpoint import load_checkpoint_state
from train.decoding import generate


def checkpoint_tokenizer_dir(checkpoint: str | Path, state: dict) -> Path | None:
    """The tokenizer a checkpoint was trained with: its run directory's ``tokenizer/`` (recorded
    relative to the checkpoint, so the run works from any directory and after a move), else the
    path older checkpoints recorded."""
    recorded = state.get("tokenizer_dir")
    candidates = [Path(checkpoint).resolve().parent.parent / "tokenizer"]
    if recorded:
        candidates += [Path(checkpoint).resolve().parent / recorded, Path(recorded)]
    return next((c for c in candidates if (c / "vocab.json").exists()), None)


def load_tokenizer_for(tokenizer_dir: str | Path | None):
    from tokenizer import Tokenizer

    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        return None
    return Tokenizer.load(tokenizer_dir)


def sample_text(
    model,
    tok,
    prompt: str,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_token: str | None,
    seed: int = 0,
) -> list[str]:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = tok.encode(prompt)
    stop = tok.special_ids.get(stop_token) if stop_token else None
    outs = generate(model, [ids] * num_samples, max_new_tokens, temperature, top_p, stop, generator=gen)
    return [prompt + tok.decode([t for t in o if t != stop]) for o in outs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by python -m train")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: the one recorded in the checkpoint)"
    )
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stop-token", default="<|endoftext|>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--kernels", default="torch", choices=BACKENDS)
    args = p.parse_args(argv)
    try:
        state = load_checkpoint_state(args.checkpoint)
        if "model_config" not in state:
            raise ValueError(f"{args.checkpoint} has no model_config; was it written by python -m train?")
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from train.trainer import check_kernels

        check_kernels(args.kernels, device)
        model = TransformerLM(ModelConfig(**state["model_config"]), kernels=args.kernels).to(device)
        model.load_state_dict(state["model"])
        tok = load_tokenizer_for(args.tokenizer or checkpoint_tokenizer_dir(args.checkpoint, state))
        if tok is None:
            raise FileNotFoundError("no tokenizer found: pass --tokenizer DIR")
        for text in sample_text(
            model,
            tok,
            args.prompt,
            args.num_samples,
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            args.stop_token,
            args.seed,
        ):
            print(text)
            print()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

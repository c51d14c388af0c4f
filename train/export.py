"""``python -m train.export --run runs/NAME --out hf/NAME``: a checkpoint as a Hugging Face Llama
directory (``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it); see
``train.hf_llama`` for what it holds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model import ModelConfig
from train.checkpoint import find_resumable, load_checkpoint_state
from train.errors import UserError
from train.generate import checkpoint_tokenizer_dir
from train.hf_llama import DTYPES, save_llama_dir


def checkpoint_of_run(run_dir: str | Path) -> Path:
    """The newest usable checkpoint of a run directory (damaged ones are reported and skipped)."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"not a run directory (no checkpoints/): {run_dir}")
    found = find_resumable(checkpoints, lambda message: print(f"warning: {message}", file=sys.stderr))
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoints}")
    return found[0]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", tokenizer_dir=None) -> Path:
    """Write the Llama directory of a checkpoint written by ``python -m train``; returns it."""
    from tokenizer import Tokenizer
    from tokenizer.pretokenize import require_dir

    require_dir(out_dir, "--out", may_be_missing=True)
    state = load_checkpoint_state(checkpoint)
    if "model_config" not in state:
        raise UserError(f"{checkpoint} has no model_config; was it written by python -m train?")
    cfg = ModelConfig(**state["model_config"])
    given = tokenizer_dir is not None
    tokenizer_dir = tokenizer_dir if given else checkpoint_tokenizer_dir(checkpoint, state)
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "vocab.json").is_file():
        if given:  # name what is wrong with the one passed
            raise FileNotFoundError(f"--tokenizer {tokenizer_dir} holds no vocab.json (not a saved tokenizer)")
        raise FileNotFoundError(f"no tokenizer found for {checkpoint}: pass --tokenizer DIR")
    tok = Tokenizer.load(tokenizer_dir)
    run = state.get("run_config") or {}
    stop = run.get("special_token") if run.get("special_token") in tok.special_ids else None
    sampling = {k: run[k] for k in ("temperature", "top_p") if k in run}
    try:
        return save_llama_dir(out_dir, cfg, state["model"], tok, dtype=dtype, stop_token=stop, sampling=sampling)
    except ValueError as e:
        raise UserError(f"cannot export {checkpoint}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by python -m train")
    src.add_argument("--run", help="a run directory: its newest usable checkpoint")
    p.add_argument("--out", required=True, help="output directory (created; its files are replaced)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights dtype [default: fp32]")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's run's)")
    args = p.parse_args(argv)
    try:
        checkpoint = args.checkpoint or checkpoint_of_run(args.run)
        out = export_checkpoint(checkpoint, args.out, args.dtype, args.tokenizer)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {checkpoint} -> {out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

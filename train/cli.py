"""Command line of ``python -m train``: a preset, then a config file, then flags, each overriding
the last. Every ModelConfig and RunConfig field is a flag (``--d-model 768``, ``--no-compile``)."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import fields

from model.config import ModelConfig
from train.config import PRESETS, RunConfig, preset, read_settings_file

MODEL_HELP = {
    "vocab_size": "vocabulary size (BPE trained on --train-text gets this size)",
    "context_length": "sequence length of training windows and the model's maximum",
    "d_model": "residual stream width",
    "num_layers": "Transformer blocks",
    "num_heads": "attention heads",
    "d_ff": "feed-forward hidden width",
    "rope_theta": "RoPE base",
    "use_rmsnorm": "ablation: --no-use-rmsnorm removes every RMSNorm",
    "post_norm": "ablation: post-norm blocks",
    "use_rope": "ablation: --no-use-rope is NoPE",
    "ffn": "feed-forward kind: swiglu or silu (the ablation; use d_ff = 4 d_model)",
    "norm_eps": "RMSNorm epsilon",
}


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, {"int": int, "float": float, "str": str, "bool": bool, "None": None})  # annotations are strings
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _add_fields(group, cls, helps, shown_defaults: dict) -> None:
    for f in fields(cls):
        tp = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        help_ = helps.get(f.name) or f.metadata.get("help", "")
        default = shown_defaults.get(f.name)
        if default is not None:
            help_ += f" [default preset: {default}]"
        help_ = help_.replace("%", "%%").replace("%%%%", "%%")
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=None, metavar=f.name.upper(), help=help_)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a Transformer LM. Settings come from the preset, then --config, then flags; "
        "the defaults shown are the tinystories preset's (--preset NAME --print-config shows any preset's).",
    )
    p.add_argument(
        "--preset", default="tinystories", choices=list(PRESETS), help="starting configuration [default: tinystories]"
    )
    p.add_argument("--config", default=None, help="JSON or TOML file of field: value overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    model_cfg, run_over = preset("tinystories")
    _add_fields(p.add_argument_group("model"), ModelConfig, MODEL_HELP, model_cfg.to_dict())
    _add_fields(p.add_argument_group("run"), RunConfig, {}, {**RunConfig().to_dict(), **run_over})
    return p


def _load_config_file(path: str) -> dict:
    data = read_settings_file(path)
    flat = {}
    for k, v in data.items():
        if isinstance(v, dict):  # allow [model] / [run] sections
            flat.update(v)
        else:
            flat[k.replace("-", "_")] = v
    return flat


def resolve(argv: list[str] | None = None) -> tuple[str, ModelConfig, RunConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    model_cfg, run_over = preset(args.preset)
    model_kw = model_cfg.to_dict()
    run_kw = dict(run_over)
    overrides = _load_config_file(args.config) if args.config else {}
    overrides.update(
        {
            k: v
            for k, v in vars(args).items()
            if v is not None and k not in ("preset", "config", "print_config", "quiet")
        }
    )
    model_names = {f.name for f in fields(ModelConfig)}
    run_names = {f.name for f in fields(RunConfig)}
    for k, v in overrides.items():
        if k in model_names:
            model_kw[k] = v
        elif k in run_names:
            run_kw[k] = v
        else:
            raise ValueError(f"unknown setting {k!r} in the config file")
    # An explicit data source replaces the preset's dataset.
    if any(run_kw.get(k) for k in ("train_data", "train_text")) and "dataset" not in overrides:
        run_kw["dataset"] = None
    if run_kw.get("max_steps") is not None and "max_tokens" not in overrides:
        run_kw["max_tokens"] = None
    return args.preset, ModelConfig(**model_kw), RunConfig(**run_kw), args


def main(argv: list[str] | None = None) -> int:
    try:
        preset_name, model_cfg, run_cfg, args = resolve(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.print_config:
        print(json.dumps({"preset": preset_name, "model": model_cfg.to_dict(), "run": run_cfg.to_dict()}, indent=2))
        return 0
    from train.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(model_cfg, run_cfg, preset_name, progress=not args.quiet)
        trainer.setup()
        code = trainer.train()
    except (ValueError, FileNotFoundError, RuntimeError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
    if trainer.dist.is_main:
        print(f"{trainer.status} at step {trainer.step}; run directory: {trainer.run_dir}", file=sys.stderr)
    return code

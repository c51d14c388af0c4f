"""Command line of ``python -m train``: a preset, then a config file, then flags, each overriding
the last. Every ModelConfig and RunConfig field is a flag (``--d-model 768``, ``--no-compile``).

Exit codes and what each means: ``train.errors``. User errors (a flag, a file, a directory, the
disk) are one line naming it; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import time
import traceback
import types
import typing
from dataclasses import fields

from model.config import ModelConfig
from train.config import CONFIG_DERIVED_KEYS, PRESETS, RunConfig, preset, read_settings_file
from train.errors import EXIT_INTERNAL, EXIT_USAGE, EXIT_USER_ERROR, STATUS_EXIT, StopRequested, UserError
from train.run_dir import USER_OS_ERRNOS

# The time budget counts from here: the process's own start, data preparation included.
PROCESS_START = time.time()


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (``x: int = 1`` then ``\"\"\"...\"\"\"``)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        a.target.id: " ".join(b.value.value.split())
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
    }


def setting_type(cls, name: str) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a config field, from its annotation."""
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def check_setting(cls, name: str, value, source: str):
    """``value`` for field ``name`` if it has the field's type (ints pass as floats), else a UserError."""
    tp, optional = setting_type(cls, name)
    if value is None and optional:
        return value
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise UserError(f"{source}: {name} must be {'a' if tp is not int else 'an'} {tp.__name__}, got {value!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_fields(group, cls, helps: dict, shown_defaults: dict) -> None:
    for f in fields(cls):
        tp, _ = setting_type(cls, f.name)
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
    p = _Parser(
        prog="python -m train",
        description="Train a Transformer LM. Settings come from the preset, then --config, then flags; "
        "the defaults shown are the tinystories preset's (--preset NAME --print-config shows any preset's).",
    )
    p.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="starting configuration [default: tinystories]"
    )
    p.add_argument(
        "--config", default=None, help="JSON or TOML file of settings (a run's config.json and --print-config work)"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines (the summary stays)")
    model_cfg, run_over = preset("tinystories")
    _add_fields(p.add_argument_group("model"), ModelConfig, field_docs(ModelConfig), model_cfg.to_dict())
    _add_fields(p.add_argument_group("run"), RunConfig, {}, {**RunConfig().to_dict(), **run_over})
    return p


def _load_config_file(path: str) -> tuple[str | None, dict]:
    """(preset named in the file, settings): flat keys, or [model] / [run] sections as in a run's
    config.json; the derived keys of a config.json are skipped."""
    data = read_settings_file(path)
    flat = {}
    for k, v in data.items():
        if k == "preset" or k in CONFIG_DERIVED_KEYS:
            continue
        if isinstance(v, dict):  # [model] / [run] sections
            flat.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        else:
            flat[k.replace("-", "_")] = v
    return data.get("preset"), flat


def resolve(argv: list[str] | None = None) -> tuple[str, ModelConfig, RunConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    file_preset, overrides = _load_config_file(args.config) if args.config else (None, {})
    preset_name = args.preset or file_preset or "tinystories"
    if preset_name not in PRESETS:
        raise UserError(f"{args.config}: unknown preset {preset_name!r}; known presets: {', '.join(PRESETS)}")
    model_cfg, run_over = preset(preset_name)
    model_kw = model_cfg.to_dict()
    run_kw = dict(run_over)
    model_names = {f.name for f in fields(ModelConfig)}
    run_names = {f.name for f in fields(RunConfig)}
    for k, v in overrides.items():
        if k in model_names:
            model_kw[k] = check_setting(ModelConfig, k, v, args.config)
        elif k in run_names:
            run_kw[k] = check_setting(RunConfig, k, v, args.config)
        else:
            raise UserError(f"{args.config}: unknown setting {k!r}")
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "config", "print_config")}
    flags.pop("quiet")
    for k, v in flags.items():
        (model_kw if k in model_names else run_kw)[k] = v
    given = {**overrides, **flags}
    # An explicit data source replaces the preset's dataset.
    if any(run_kw.get(k) for k in ("train_data", "train_text")) and "dataset" not in given:
        run_kw["dataset"] = None
    if run_kw.get("max_steps") is not None and "max_tokens" not in given:
        run_kw["max_tokens"] = None
    try:
        if run_kw.get("init_from"):  # the model is the directory's; only free settings may be given
            from train.hf_llama import init_model_config

            model = init_model_config(run_kw["init_from"], {k: v for k, v in given.items() if k in model_names})
            return preset_name, model, RunConfig(**run_kw), args
        return preset_name, ModelConfig(**model_kw), RunConfig(**run_kw), args
    except ValueError as e:
        raise UserError(str(e)) from None


def _user_error(e: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug."""
    if isinstance(e, (UserError, FileNotFoundError, ConnectionError)):
        return str(e)
    if isinstance(e, OSError) and e.errno in USER_OS_ERRNOS:
        return f"{e.strerror}: {e.filename}" if e.filename else str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        preset_name, model_cfg, run_cfg, args = resolve(argv)
    except (FileNotFoundError, ValueError) as e:  # UserError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.print_config:
        print(json.dumps({"preset": preset_name, "model": model_cfg.to_dict(), "run": run_cfg.to_dict()}, indent=2))
        return 0
    from train.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(model_cfg, run_cfg, preset_name, "quiet" if args.quiet else "auto", PROCESS_START)
        try:
            trainer.setup()
        except StopRequested as stop:  # a signal during data preparation or model building
            return trainer.finish(f"interrupted by {stop.signal_name}")
        return trainer.train()
    except Exception as e:
        message = _user_error(e)
        code = EXIT_INTERNAL if message is None else EXIT_USER_ERROR
        if trainer is not None:
            trainer.record_failure(message or f"{type(e).__name__}: {e}", code)
        if message is None:
            traceback.print_exc()
            print("internal error (the traceback above): please report it", file=sys.stderr)
        else:
            print(f"error: {message}", file=sys.stderr)
        return code
    except StopRequested as stop:  # a signal before the trainer could handle it
        print(f"stopped by {stop.signal_name} before training started", file=sys.stderr)
        return STATUS_EXIT[f"interrupted by {stop.signal_name}"]
    finally:
        if trainer is not None:
            trainer.print_summary()
            trainer.close()

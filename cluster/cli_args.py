"""Command-line flags for every flat engine option, derived from the pydantic config models,
so that `--max-num-seqs` and ray_config.yaml's `max_num_seqs` can never drift apart."""
import argparse
import typing
from typing import Any

from pydantic import BaseModel

from cluster.config import _SECTIONS, EngineConfig, engine_args_from_yaml


def _parser_type(annotation):
    """argparse converter for a field's annotation (Optional[...] and Literal[...] unwrapped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if args and typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")):
        return _parser_type(args[0])
    if annotation is bool:
        return _bool, None
    return annotation, None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_model_args(group, model: type[BaseModel]) -> None:
    """One --kebab-case flag per field of a pydantic model, typed and described from the field."""
    for name, field in model.model_fields.items():
        kind, choices = _parser_type(field.annotation)
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, choices=choices,
                           default=None, help=field.description)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (also settable under args.engine in ray_config.yaml)")
    group.add_argument("--config", help="ray_config.yaml (Serve format) or a flat YAML of engine options")
    for model in _SECTIONS.values():
        add_model_args(group, model)


def model_from_args(args: argparse.Namespace, model: type[BaseModel]) -> BaseModel:
    return model(**{k: getattr(args, k) for k in model.model_fields if getattr(args, k, None) is not None})


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """YAML first (when --config is given), then flags that were set on the command line."""
    values: dict[str, Any] = engine_args_from_yaml(args.config) if getattr(args, "config", None) else {}
    for model in _SECTIONS.values():
        for name in model.model_fields:
            if getattr(args, name, None) is not None:
                values[name] = getattr(args, name)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return EngineConfig.from_flat(values)

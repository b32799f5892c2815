"""Declare ROS parameters that mirror the core config dataclasses, and read them back.

Each field of ``UdfConfig``, ``TrainConfig`` and ``RegistrationConfig`` becomes a dotted
parameter (``registration.num_hypotheses``) with the dataclass default, the field's docstring
as its description and the range that ``__post_init__`` enforces as a descriptor range, so
rclpy rejects an out-of-range value before the core sees it. Cross-field checks
(``fine_top_k <= num_hypotheses``) stay in :func:`configs_from_dict`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import Any, Iterable, Mapping

from neural_bone_reg.core import config as core_config
from neural_bone_reg.core.config import Configs, configs_from_dict
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node

SECTIONS: dict[str, type] = {
    'udf': core_config.UdfConfig,
    'train': core_config.TrainConfig,
    'registration': core_config.RegistrationConfig,
}

# Closed ranges mirroring the checks in core/config.py. Open bounds such as (0, 1] are given
# closed here; configs_from_dict still rejects the excluded end point with a clear message.
RANGES: dict[str, tuple[float, float]] = {
    'udf.hidden_dim': (8, 1024),
    'udf.num_hidden_layers': (1, 8),
    'udf.num_frequencies': (0, 12),
    'train.iterations': (1, 1_000_000),
    'train.batch_size': (64, 1_000_000),
    'train.learning_rate': (0.0, 1.0),
    'train.num_samples': (1_000, 10_000_000),
    'train.uniform_fraction': (0.0, 1.0),
    'train.margin_mm': (0.0, 500.0),
    'train.grid_voxel_mm': (0.25, 10.0),
    'train.num_surface_points': (1_000, 1_000_000),
    'train.seed': (0, 2**31 - 1),
    'registration.num_hypotheses': (1, 100_000),
    'registration.latent_dim': (1, 512),
    'registration.backbone_dim': (1, 1024),
    'registration.coarse_points': (8, 100_000),
    'registration.coarse_iterations': (0, 100_000),
    'registration.fine_top_k': (1, 100_000),
    'registration.fine_points': (8, 1_000_000),
    'registration.fine_iterations': (0, 100_000),
    'registration.learning_rate': (0.0, 1.0),
    'registration.translation_scale_mm': (0.0, 1000.0),
    'registration.robust_scale_mm': (0.0, 100.0),
    'registration.final_candidates': (1, 100_000),
    'registration.distinct_rotation_deg': (0.0, 180.0),
    'registration.distinct_translation_mm': (0.0, 1000.0),
    'registration.refine_iterations': (0, 1000),
    'registration.refine_tolerance_mm': (0.0, 10.0),
    'registration.inlier_threshold_mm': (0.0, 100.0),
    'registration.max_points': (3, 10_000_000),
    'registration.min_points': (3, 10_000_000),
    'registration.early_stop_tolerance': (0.0, 1.0),
    'registration.gate_max_residual_mm': (0.0, 100.0),
    'registration.gate_min_inlier_fraction': (0.0, 1.0),
    'registration.gate_max_ambiguity': (0.0, 1.0),
    'registration.seed': (0, 2**31 - 1),
}


def field_docstrings(cls: type) -> dict[str, str]:
    """Return the attribute docstrings (the string after each field) of a dataclass."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for stmt, following in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[stmt.target.id] = ' '.join(following.value.value.split())
    return docs


def descriptor(description: str, value: Any, *, value_range: tuple[float, float] | None = None,
               read_only: bool = False) -> ParameterDescriptor:
    """Return a descriptor with a description and, for numbers, an inclusive range."""
    desc = ParameterDescriptor(description=description, read_only=read_only)
    if value_range is not None and not isinstance(value, bool):
        low, high = value_range
        if isinstance(value, int):
            desc.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=1)]
        elif isinstance(value, float):
            desc.floating_point_range = [
                FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)]
    return desc


def declare(node: Node, name: str, default: Any, description: str, *,
            value_range: tuple[float, float] | None = None, read_only: bool = False) -> Any:
    """Declare one parameter with a descriptor and return its value (override or default)."""
    param = node.declare_parameter(
        name, default,
        descriptor(description, default, value_range=value_range, read_only=read_only))
    return param.value


def _ros_default(value: Any) -> Any:
    """Return a dataclass default as a ROS parameter value (tuples become float lists)."""
    if isinstance(value, tuple):
        return [float(v) for v in value]
    return value


def declare_config_parameters(node: Node, sections: Iterable[str]) -> None:
    """Declare every field of the given config sections as a dotted, described parameter."""
    for section in sections:
        cls = SECTIONS[section]
        docs = field_docstrings(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            name = f'{section}.{f.name}'
            default = _ros_default(getattr(defaults, f.name))
            description = docs.get(f.name, f'{cls.__name__}.{f.name}')
            declare(node, name, default, description, value_range=RANGES.get(name))


def config_values(node: Node, sections: Iterable[str],
                  changes: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Return ``{section: {field: value}}`` from the node's parameters, with ``changes`` on top."""
    changes = dict(changes or {})
    values: dict[str, dict[str, Any]] = {}
    for section in sections:
        cls = SECTIONS[section]
        values[section] = {}
        for f in dataclasses.fields(cls):
            name = f'{section}.{f.name}'
            value = changes[name] if name in changes else node.get_parameter(name).value
            values[section][f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return values


def build_configs(node: Node, sections: Iterable[str], preset: str = 'default',
                  changes: Mapping[str, Any] | None = None) -> Configs:
    """Build the core configs from the parameters; a bad value raises ValueError naming it.

    Registration parameters left at their dataclass default take the preset's value, so a
    preset such as 'fast' applies unless a parameter overrides it explicitly.
    """
    values = config_values(node, sections, changes)
    if 'registration' in values:
        defaults = core_config.RegistrationConfig()
        values['registration'] = {k: v for k, v in values['registration'].items()
                                  if v != getattr(defaults, k)}
    return configs_from_dict(values, preset=preset)


def format_configs(configs: Configs, sections: Iterable[str]) -> str:
    """Return the values in use, one ``section: field=value ...`` line per section."""
    lines = []
    for section in sections:
        items = core_config.as_dict(getattr(configs, section)).items()
        lines.append(f'{section}: ' + ' '.join(f'{key}={value}' for key, value in items))
    return '\n'.join(lines)

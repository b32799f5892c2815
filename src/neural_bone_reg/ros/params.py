"""Declare ROS parameters that mirror the core config dataclasses, and read them back.

Each field of ``UdfConfig``, ``TrainConfig`` and ``RegistrationConfig`` becomes a dotted
parameter (``registration.num_hypotheses``) with the dataclass default, the field's
docstring as its description and the range that ``__post_init__`` enforces (read from its
source) as a descriptor range, so rclpy rejects an out-of-range value before the core sees
it. Cross-field checks (``fine_top_k <= num_hypotheses``) stay in :func:`configs_from_dict`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import Any, Iterable, Mapping

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node

from neural_bone_reg.core import config as core_config
from neural_bone_reg.core.config import Configs, configs_from_dict

SECTIONS: dict[str, type] = {
    'udf': core_config.UdfConfig,
    'train': core_config.TrainConfig,
    'registration': core_config.RegistrationConfig,
}

#: Bounds used where ``__post_init__`` states none (seeds, or a bound given by another field).
INT_FALLBACK = (0, 2**31 - 1)
FLOAT_FALLBACK = (-1e300, 1e300)


def _constant(node: ast.AST) -> float | None:
    """Return the number an AST node spells (``1_000``, ``1e6``, ``-2``), else None."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def field_ranges(cls: type) -> dict[str, tuple[float | None, float | None]]:
    """Return ``{field: (low, high)}`` read from the ``low <= self.f <= high`` checks.

    The bounds come from the comparisons in the dataclass's ``__post_init__``, so the ROS
    descriptors follow the core's validation without a second table. A bound that is not a
    literal (``fine_top_k <= num_hypotheses``) is None. Open bounds are reported closed;
    ``configs_from_dict`` still rejects the end point itself with a clear message.
    """
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError, SyntaxError):
        return {}
    ranges: dict[str, list[float | None]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        if not all(isinstance(op, (ast.Lt, ast.LtE)) for op in node.ops):
            continue
        for i, operand in enumerate(operands):
            if not (isinstance(operand, ast.Attribute) and isinstance(operand.value, ast.Name)
                    and operand.value.id == 'self'):
                continue
            bounds = ranges.setdefault(operand.attr, [None, None])
            low = _constant(operands[i - 1]) if i > 0 else None
            high = _constant(operands[i + 1]) if i + 1 < len(operands) else None
            if low is not None:
                bounds[0] = low if bounds[0] is None else max(bounds[0], low)
            if high is not None:
                bounds[1] = high if bounds[1] is None else min(bounds[1], high)
    return {name: (low, high) for name, (low, high) in ranges.items()}


def parameter_range(section: str, name: str, default: Any) -> tuple[float, float] | None:
    """Return the inclusive range of a config parameter, filling unstated bounds."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return None
    low, high = field_ranges(SECTIONS[section]).get(name, (None, None))
    fallback = INT_FALLBACK if isinstance(default, int) else FLOAT_FALLBACK
    return (fallback[0] if low is None else low, fallback[1] if high is None else high)


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
            declare(node, name, default, description,
                    value_range=parameter_range(section, f.name, default))


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

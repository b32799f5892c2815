"""Declare ROS parameters that mirror the core config dataclasses, and read them back.

Each field of ``UdfConfig``, ``TrainConfig``, ``RegistrationConfig``, ``SweepConfig`` and
``TrackingConfig`` becomes a dotted parameter (``registration.num_hypotheses``) with the
dataclass default, and a descriptor made from the field's metadata (``core.config.spec``):
its ``doc`` as the description and its ``range`` as the descriptor range, so rclpy rejects an
out-of-range value before the core sees it. Cross-field checks (``fine_top_k <=
num_hypotheses``) stay in the dataclasses' ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node

from neural_bone_reg.core import config as core_config
from neural_bone_reg.core.config import Configs, configs_from_dict, section_from_dict

SECTIONS: dict[str, type] = {
    'udf': core_config.UdfConfig,
    'train': core_config.TrainConfig,
    'registration': core_config.RegistrationConfig,
    'sweep': core_config.SweepConfig,
    'track': core_config.TrackingConfig,
}

#: Bounds used where a field declares none (seeds, or a bound given by another field).
INT_FALLBACK = (0, 2**31 - 1)
FLOAT_FALLBACK = (-1e300, 1e300)


def field_ranges(cls: type) -> dict[str, tuple[float | None, float | None]]:
    """Return ``{field: (low, high)}`` for the fields whose metadata declares a range.

    A bound set by another field (``fine_top_k <= num_hypotheses``) is None. Open bounds are
    reported closed; ``__post_init__`` still rejects the end point itself with a clear message.
    """
    return {f.name: core_config.field_range(f) for f in dataclasses.fields(cls)
            if f.metadata.get('range')}


def parameter_range(section: str, name: str, default: Any) -> tuple[float, float] | None:
    """Return the inclusive range of a config parameter, filling unstated bounds."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return None
    low, high = field_ranges(SECTIONS[section]).get(name, (None, None))
    fallback = INT_FALLBACK if isinstance(default, int) else FLOAT_FALLBACK
    return (fallback[0] if low is None else low, fallback[1] if high is None else high)


def field_docs(cls: type) -> dict[str, str]:
    """Return ``{field: description}`` from the fields' metadata."""
    return {f.name: f.metadata['doc'] for f in dataclasses.fields(cls) if f.metadata.get('doc')}


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


def declare_config_parameters(node: Node, sections: Iterable[str],
                              read_only: Iterable[str] = ()) -> None:
    """Declare every field of the given config sections as a dotted, described parameter.

    The sections named in ``read_only`` are read only: set at start, refused at runtime
    (for settings used only at start, so that a change cannot be accepted and ignored).
    """
    read_only = set(read_only)
    for section in sections:
        cls = SECTIONS[section]
        docs = field_docs(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            name = f'{section}.{f.name}'
            default = _ros_default(getattr(defaults, f.name))
            description = docs.get(f.name, f'{cls.__name__}.{f.name}')
            if f.metadata.get('unit'):
                description += f" Unit: {f.metadata['unit']}."
            if section in read_only:
                description += ' Read-only: used at start only.'
            declare(node, name, default, description,
                    value_range=parameter_range(section, f.name, default),
                    read_only=section in read_only)


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


def build_section(node: Node, section: str, changes: Mapping[str, Any] | None = None) -> Any:
    """Build one section's dataclass (``sweep``, ``track``) from the parameters and ``changes``."""
    values = config_values(node, (section,), changes)[section]
    return section_from_dict(SECTIONS[section], values, section)


def build_configs(node: Node, sections: Iterable[str], preset: str = 'default',
                  changes: Mapping[str, Any] | None = None,
                  explicit: Iterable[str] = ()) -> Configs:
    """Build the core configs from the parameters; a bad value raises ValueError naming it.

    Registration parameters left at their dataclass default take the preset's value, so a
    preset such as 'fast' applies unless a parameter overrides it. A parameter in ``changes``
    or named in ``explicit`` (those set at runtime) is an override whatever its value: set
    to the dataclass default, it is used, not replaced by the preset's.
    """
    values = config_values(node, sections, changes)
    if 'registration' in values:
        defaults = core_config.RegistrationConfig()
        chosen = set(explicit) | set(changes or {})
        values['registration'] = {k: v for k, v in values['registration'].items()
                                  if v != getattr(defaults, k)
                                  or f'registration.{k}' in chosen}
    return configs_from_dict(values, preset=preset)


def format_configs(configs: Configs | Mapping[str, Any], sections: Iterable[str]) -> str:
    """Return the values in use, one ``section: field=value ...`` line per section.

    ``configs`` is a ``Configs`` or a mapping ``{section: config dataclass}``.
    """
    lines = []
    for section in sections:
        config = configs[section] if isinstance(configs, Mapping) else getattr(configs, section)
        items = core_config.as_dict(config).items()
        lines.append(f'{section}: ' + ' '.join(f'{key}={value}' for key, value in items))
    return '\n'.join(lines)

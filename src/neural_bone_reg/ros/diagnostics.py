"""Build diagnostic_msgs messages for the nodes (no logic beyond formatting)."""

from __future__ import annotations

from typing import Any, Mapping

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

OK = DiagnosticStatus.OK
WARN = DiagnosticStatus.WARN
ERROR = DiagnosticStatus.ERROR

DIAGNOSTICS_TOPIC = '/diagnostics'


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:.6g}'
    if isinstance(value, (list, tuple)):
        return '; '.join(str(v) for v in value)
    return str(value)


def diagnostic_array(node: Node, component: str, level: bytes, message: str,
                     values: Mapping[str, Any] | None = None) -> DiagnosticArray:
    """Return a one-status DiagnosticArray named '<node fqn>: <component>', stamped now."""
    status = DiagnosticStatus(
        level=level, name=f'{node.get_fully_qualified_name()}: {component}', message=message,
        hardware_id=node.get_name(),
        values=[KeyValue(key=str(k), value=_format(v)) for k, v in (values or {}).items()])
    array = DiagnosticArray(status=[status])
    array.header.stamp = node.get_clock().now().to_msg()
    return array

"""Build diagnostic_msgs messages for the nodes (no logic beyond formatting)."""

from __future__ import annotations

from typing import Any, Mapping

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

OK = DiagnosticStatus.OK
WARN = DiagnosticStatus.WARN
ERROR = DiagnosticStatus.ERROR

DIAGNOSTICS_TOPIC = '/diagnostics'
#: Longest status message, characters: a reason and what was expected fit easily; a message
#: built from hostile input (a 10,000-field table once gave 89,010 characters) is cut.
MAX_MESSAGE_CHARS = 1000
#: Longest key/value value, characters (frame ids and the like come from the input).
MAX_VALUE_CHARS = 200
#: Values of the core's own sentences (why a result was refused, where more data would help),
#: capped at MAX_MESSAGE_CHARS instead: they are longer than a frame id, and not from input.
TEXT_VALUE_KEYS = frozenset({'rejection_reasons', 'guidance'})


def cap_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Return ``text`` cut to at most ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    keep = limit
    while True:  # the marker's length depends on the count it reports
        marker = f' ... [{len(text) - keep} more characters cut]'
        if keep + len(marker) <= limit or keep == 0:
            return text[:keep] + marker
        keep = max(0, limit - len(marker))


def printable(text: str) -> str:
    """Return ``text`` with control characters escaped, so a diagnostic stays one clean line."""
    if text.isprintable():
        return text
    return ''.join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:.6g}'
    if isinstance(value, (list, tuple)):
        return '; '.join(str(v) for v in value)
    return str(value)


def diagnostic_array(node: Node, component: str, level: bytes, message: str,
                     values: Mapping[str, Any] | None = None) -> DiagnosticArray:
    """Return a one-status DiagnosticArray named '<node fqn>: <component>', stamped now.

    The message is capped at MAX_MESSAGE_CHARS and each value at MAX_VALUE_CHARS characters
    (those of TEXT_VALUE_KEYS at MAX_MESSAGE_CHARS).
    """
    status = DiagnosticStatus(
        level=level, name=f'{node.get_fully_qualified_name()}: {component}',
        message=cap_text(printable(message)), hardware_id=node.get_name(),
        values=[KeyValue(key=str(k), value=cap_text(
            printable(_format(v)), MAX_MESSAGE_CHARS if k in TEXT_VALUE_KEYS else MAX_VALUE_CHARS))
            for k, v in (values or {}).items()])
    array = DiagnosticArray(status=[status])
    array.header.stamp = node.get_clock().now().to_msg()
    return array

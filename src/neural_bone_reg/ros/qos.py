"""QoS profiles shared by the nodes, the demo and the tests, so both ends of a topic agree."""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy


def reliable_qos(depth: int, durability: DurabilityPolicy) -> QoSProfile:
    """Return a reliable keep-last profile of ``depth`` with ``durability``."""
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE, durability=durability)


#: Latched, reliable, depth 1: late joiners get the model announcement, the bone surface and
#: the last registered cloud once they exist.
LATCHED_QOS = reliable_qos(1, DurabilityPolicy.TRANSIENT_LOCAL)

#: The /diagnostics topic as diagnostic_updater publishes it: reliable, volatile, depth 10.
DIAGNOSTICS_QOS = reliable_qos(10, DurabilityPolicy.VOLATILE)

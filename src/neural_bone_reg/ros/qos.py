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

#: The values of the registration node's cloud_qos.reliability and cloud_qos.history.
CLOUD_RELIABILITIES = {'reliable': ReliabilityPolicy.RELIABLE,
                       'best_effort': ReliabilityPolicy.BEST_EFFORT}
CLOUD_HISTORIES = {'keep_last': HistoryPolicy.KEEP_LAST, 'keep_all': HistoryPolicy.KEEP_ALL}
#: Defaults of the cloud subscription. Reliable: across processes Fast DDS delivered no
#: best-effort cloud above 1.2 MB here (a 640 x 480 RGB-D cloud is 5 MB); see the README.
DEFAULT_CLOUD_RELIABILITY = 'reliable'
DEFAULT_CLOUD_HISTORY = 'keep_last'
#: Clouds the subscription may hold before the callback takes them (keep_last); the node
#: itself only ever solves the newest.
DEFAULT_CLOUD_DEPTH = 5
#: Largest cloud_qos.depth: each queued cloud can be megabytes.
MAX_CLOUD_DEPTH = 1000
#: What this package's own cloud publishers offer (tests, demo, benchmarks): reliable, so
#: that both reliable and best-effort subscriptions match it.
CLOUD_PUBLISHER_QOS = reliable_qos(10, DurabilityPolicy.VOLATILE)


def cloud_qos(reliability: str = DEFAULT_CLOUD_RELIABILITY, history: str = DEFAULT_CLOUD_HISTORY,
              depth: int = DEFAULT_CLOUD_DEPTH) -> QoSProfile:
    """Return the volatile cloud subscription profile; raise ValueError for a bad setting.

    A reliable subscription matches reliable publishers only; best effort matches both but
    loses large clouds. ``depth`` is ignored with keep_all.
    """
    if reliability not in CLOUD_RELIABILITIES:
        raise ValueError(f'cloud_qos.reliability must be one of {sorted(CLOUD_RELIABILITIES)}, '
                         f'got {reliability!r}')
    if history not in CLOUD_HISTORIES:
        raise ValueError(f'cloud_qos.history must be one of {sorted(CLOUD_HISTORIES)}, '
                         f'got {history!r}')
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_CLOUD_DEPTH:
        raise ValueError(f'cloud_qos.depth must be an integer in [1, {MAX_CLOUD_DEPTH}], '
                         f'got {depth!r}')
    return QoSProfile(depth=depth, history=CLOUD_HISTORIES[history],
                      reliability=CLOUD_RELIABILITIES[reliability],
                      durability=DurabilityPolicy.VOLATILE)

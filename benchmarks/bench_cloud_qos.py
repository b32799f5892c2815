#!/usr/bin/env python3
"""Largest PointCloud2 that arrives across processes, for each cloud QoS setting.

For each setting a subscription is made in this process with ``ros.qos.cloud_qos`` (the
profile the registration node builds from its ``cloud_qos.*`` parameters), and a publisher in
a child process sends clouds of each size a few times, spaced out. A cloud counts as arrived
when its callback runs; the latency is the callback's wall-clock time minus the stamp, which
the publisher sets to its wall clock just before publishing (one host, one clock).

    .venv/bin/python benchmarks/bench_cloud_qos.py --tries 4 --json out/cloud_qos.json

The middleware is whatever rclpy uses here (Fast DDS from the PyPI wheels, shared memory on
one host). Clouds are unorganised x y z + rgb float32 (16 bytes a point), like RGB-D drivers.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import random
import statistics
import subprocess
import sys
import threading
import time

#: Cloud sizes sent, MB (10^6 bytes); a 640 x 480 x 16-byte RGB-D cloud is 4.9 MB.
DEFAULT_SIZES_MB = (0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 24.0)
#: Subscription (reliability, history, depth) and publisher reliability pairs measured.
DEFAULT_SETTINGS = ('best_effort/keep_last/5:best_effort', 'best_effort/keep_last/5:reliable',
                    'reliable/keep_last/5:reliable', 'reliable/keep_last/1:reliable',
                    'reliable/keep_all/5:reliable', 'reliable/keep_last/5:best_effort')
#: Bytes of one x y z rgb float32 point.
POINT_BYTES = 16
#: Seconds between two clouds (keeps clouds from queueing behind each other).
DEFAULT_GAP_S = 0.4
#: Seconds the publisher waits for the subscription to match.
MATCH_TIMEOUT_S = 10.0
#: Seconds the subscriber waits after the publisher exits for late clouds.
DRAIN_S = 2.0


def _cloud(size_bytes: int, frame_id: str):
    """Return an x y z rgb PointCloud2 of about ``size_bytes`` bytes of data."""
    import numpy as np
    from sensor_msgs.msg import PointCloud2, PointField

    n = max(1, size_bytes // POINT_BYTES)
    msg = PointCloud2(height=1, width=n, point_step=POINT_BYTES, row_step=POINT_BYTES * n,
                      is_bigendian=False, is_dense=True)
    msg.header.frame_id = frame_id
    msg.fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, name in enumerate(('x', 'y', 'z', 'rgb'))]
    msg.data = np.random.default_rng(n).uniform(-0.2, 0.2, 4 * n).astype('<f4').tobytes()
    return msg


def publish(args: argparse.Namespace) -> int:
    """Child process: publish every size ``args.tries`` times with ``args.pub_reliability``."""
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    rclpy.init()
    node = rclpy.create_node('bench_cloud_qos_publisher')
    reliability = {'reliable': ReliabilityPolicy.RELIABLE,
                   'best_effort': ReliabilityPolicy.BEST_EFFORT}[args.pub_reliability]
    pub = node.create_publisher(PointCloud2, args.topic,
                                QoSProfile(depth=10, reliability=reliability))
    deadline = time.monotonic() + MATCH_TIMEOUT_S
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    matched = pub.get_subscription_count()
    print(f'matched {matched}', flush=True)
    time.sleep(0.5)
    for i, size in enumerate(args.sizes_mb):
        for attempt in range(args.tries):
            msg = _cloud(int(size * 1e6), f'{i}_{attempt}')
            now = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now, 1_000_000_000)
            pub.publish(msg)
            time.sleep(args.gap_s + size * 0.01)
    time.sleep(DRAIN_S)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def measure(setting: str, args: argparse.Namespace) -> dict:
    """Run one setting; return per-size arrivals and latencies."""
    import rclpy
    from rclpy.event_handler import SubscriptionEventCallbacks
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import PointCloud2

    from neural_bone_reg.ros.qos import cloud_qos

    sub_part, pub_reliability = setting.split(':')
    reliability, history, depth = sub_part.split('/')
    context = rclpy.context.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('bench_cloud_qos_subscriber', context=context)
    arrivals: dict[str, float] = {}
    events = {'lost': 0, 'incompatible': 0}

    def on_cloud(msg: PointCloud2) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        arrivals[msg.header.frame_id] = (time.time_ns() - stamp) / 1e9

    def on_lost(info) -> None:
        events['lost'] = info.total_count

    def on_incompatible(info) -> None:
        events['incompatible'] = info.total_count

    topic = f'/bench_cloud_qos_{os.getpid()}'
    node.create_subscription(PointCloud2, topic, on_cloud,
                             cloud_qos(reliability, history, int(depth)),
                             event_callbacks=SubscriptionEventCallbacks(
                                 message_lost=on_lost, incompatible_qos=on_incompatible))
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    child = subprocess.run(
        [sys.executable, __file__, '--publish', '--topic', topic, '--pub-reliability',
         pub_reliability, '--tries', str(args.tries), '--gap-s', str(args.gap_s),
         '--sizes-mb', *map(str, args.sizes_mb)], capture_output=True, text=True)
    time.sleep(DRAIN_S)
    executor.shutdown()
    thread.join(5.0)
    node.destroy_node()
    rclpy.try_shutdown(context=context)
    rows = []
    for i, size in enumerate(args.sizes_mb):
        latencies = [arrivals[f'{i}_{a}'] for a in range(args.tries) if f'{i}_{a}' in arrivals]
        rows.append({'size_mb': size, 'arrived': len(latencies), 'sent': args.tries,
                     'median_latency_ms': (1e3 * statistics.median(latencies)
                                           if latencies else None),
                     'max_latency_ms': 1e3 * max(latencies) if latencies else None})
    largest = max([r['size_mb'] for r in rows if r['arrived'] == r['sent']], default=0.0)
    return {'setting': setting, 'rows': rows, 'largest_always_mb': largest,
            'publisher_log': child.stdout.strip(), 'message_lost_events': events['lost'],
            'incompatible_qos_events': events['incompatible']}


def main() -> int:
    """Parse arguments; run as the measuring parent or as the publishing child."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes-mb', type=float, nargs='+', default=list(DEFAULT_SIZES_MB))
    parser.add_argument('--tries', type=int, default=4)
    parser.add_argument('--gap-s', type=float, default=DEFAULT_GAP_S)
    parser.add_argument('--settings', nargs='+', default=list(DEFAULT_SETTINGS),
                        help='SUB_RELIABILITY/HISTORY/DEPTH:PUB_RELIABILITY')
    parser.add_argument('--json', type=Path)
    parser.add_argument('--publish', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--topic', help=argparse.SUPPRESS)
    parser.add_argument('--pub-reliability', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        return publish(args)
    os.environ.setdefault('ROS_DOMAIN_ID', str(random.SystemRandom().randint(1, 200)))
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    import rclpy
    results = {'rclpy': getattr(rclpy, '__version__', ''), 'rmw': os.environ.get(
        'RMW_IMPLEMENTATION', 'default (rmw_fastrtps_cpp)'), 'settings': []}
    for setting in args.settings:
        result = measure(setting, args)
        results['settings'].append(result)
        arrived = ' '.join(f"{r['size_mb']:g}MB:{r['arrived']}/{r['sent']}"
                           + (f"({r['median_latency_ms']:.0f}ms)" if r['arrived'] else '')
                           for r in result['rows'])
        print(f"{setting:38s} largest always {result['largest_always_mb']:g} MB  {arrived}  "
              f"lost events {result['message_lost_events']} incompatible "
              f"{result['incompatible_qos_events']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

#!/usr/bin/env python3
"""Latency of a 640 x 480 RGB-D cloud from another process to the node's callback and to tf.

Starts a ``registration_node`` process with the package's params file (default cloud QoS:
reliable, keep_last 5) and ``mode:=single``, then publishes from this process organised
640 x 480 x + y + z + rgb clouds (4.9 MB, NaN where there is no return) of a posed phantom
patch, stamped with the wall clock just before publishing, one at a time. Per cloud it records
the node's ``last_input_age_s`` (its clock after checking and converting the cloud in the
callback, minus the stamp; from the next heartbeat) and the arrival on /tf of the transform
with that stamp. ``--phase transport`` runs the node without a model, so that no solve competes
with the callback; ``--phase tf`` loads the checkpoint and waits for each transform.

    .venv/bin/python benchmarks/bench_rgbd_delivery.py --phase transport --clouds 20
    .venv/bin/python benchmarks/bench_rgbd_delivery.py --phase tf --checkpoint CKPT --clouds 5

Without ``--checkpoint`` the phantom is trained (or loaded) with the default configs.
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
import tempfile
import threading
import time

REPO = Path(__file__).resolve().parents[1]
#: Seconds for the node to start and load the model, and for one solve.
START_TIMEOUT_S = 120.0
SOLVE_TIMEOUT_S = 120.0
#: Pixels of the 640 x 480 image that see bone (the rest return nothing: NaN).
BONE_PIXELS = 20_000


def _image_cloud(points_mm, frame: str, stamp_ns: int, rng):
    """Return a 640 x 480 xyz + rgb cloud with ``points_mm`` in random pixels, NaN elsewhere."""
    import numpy as np

    from neural_bone_reg.ros.conversions import image_to_cloud

    height, width = 480, 640
    image = np.full((height * width, 3), np.nan)
    pixels = np.sort(rng.choice(height * width, size=len(points_mm), replace=False))
    image[pixels] = points_mm
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return image_to_cloud(image.reshape(height, width, 3), frame, stamp_ns, rgb=rgb)


def main() -> int:
    """Run the measurement; print and optionally save the latencies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--phase', choices=('transport', 'tf'), default='tf')
    parser.add_argument('--checkpoint', type=Path, help='phantom checkpoint (else trained)')
    parser.add_argument('--preset', default='default')
    parser.add_argument('--clouds', type=int, default=10)
    parser.add_argument('--gap-s', type=float, default=1.0, help='pause after each tf')
    parser.add_argument('--json', type=Path)
    args = parser.parse_args()
    os.environ.setdefault('ROS_DOMAIN_ID', str(random.SystemRandom().randint(1, 200)))
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')

    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    import numpy as np
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import PointCloud2
    from tf2_msgs.msg import TFMessage

    from neural_bone_reg.core import sim
    from neural_bone_reg.core.se3 import apply_transform
    from neural_bone_reg.ros.qos import CLOUD_PUBLISHER_QOS, DIAGNOSTICS_QOS
    from neural_bone_reg.ros.tf_compat import DYNAMIC_LISTENER_QOS

    checkpoint = args.checkpoint
    if args.phase == 'transport':
        checkpoint = ''
    elif checkpoint is None:
        from neural_bone_reg import BoneRegistrar
        checkpoint = BoneRegistrar.from_mesh(sim.phantom_mesh_path()).checkpoint_path
    log = tempfile.NamedTemporaryFile(prefix='bench_rgbd_node_', suffix='.log', delete=False)
    node_proc = subprocess.Popen(
        [str(Path(sys.executable).parent / 'registration_node'), '--ros-args',
         '--params-file', str(REPO / 'config' / 'registration_node.yaml'),
         *(['-p', f'checkpoint:={checkpoint}'] if checkpoint else []), '-p', 'mode:=single',
         '-p', f'preset:={args.preset}', '-r', 'points:=/rgbd/points',
         '-r', '__node:=bench_rgbd_node'], stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    probe = rclpy.create_node('bench_rgbd_probe')
    cond = threading.Condition()
    tf_arrivals: dict[tuple[int, int], float] = {}
    beats: list[dict[str, str]] = []
    model_ok = threading.Event()

    def on_tf(msg) -> None:
        now = time.time_ns()
        with cond:
            for t in msg.transforms:
                tf_arrivals[(t.header.stamp.sec, t.header.stamp.nanosec)] = now
            cond.notify_all()

    def on_diag(msg) -> None:
        for status in msg.status:
            if status.name.endswith('bench_rgbd_node: model'):
                values = {kv.key: kv.value for kv in status.values}
                if 'clouds_received' in values:
                    with cond:
                        beats.append(values)
                        cond.notify_all()
                if status.level == DiagnosticStatus.OK or args.phase == 'transport':
                    model_ok.set()  # the model is loaded, or (transport) the node is up

    probe.create_subscription(TFMessage, '/tf', on_tf, DYNAMIC_LISTENER_QOS)
    probe.create_subscription(DiagnosticArray, '/diagnostics', on_diag, DIAGNOSTICS_QOS)
    pub = probe.create_publisher(PointCloud2, '/rgbd/points', CLOUD_PUBLISHER_QOS)
    executor = SingleThreadedExecutor()
    executor.add_node(probe)
    threading.Thread(target=executor.spin, daemon=True).start()
    rows = []
    try:
        if not model_ok.wait(START_TIMEOUT_S):
            print('node did not load the model; log:', Path(log.name).read_text()[-3000:])
            return 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        rng = np.random.default_rng(0)
        mesh = sim.make_phantom_mesh()
        for i in range(args.clouds):
            pose = sim.random_pose(rng)
            patch = sim.simulate_partial_cloud(mesh, rng, n_points=BONE_PIXELS)
            now = time.time_ns()
            msg = _image_cloud(apply_transform(pose, patch), 'rgbd_camera', now, rng)
            stamp_ns = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
            key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
            with cond:
                n_beats = len(beats)
            cpu0 = time.process_time()
            pub.publish(msg)
            publish_s = time.process_time() - cpu0
            with cond:
                got_tf = args.phase == 'tf' and cond.wait_for(lambda: key in tf_arrivals,
                                                              SOLVE_TIMEOUT_S)
                cond.wait_for(lambda: len(beats) > n_beats + 1, 5.0)
                age = next((float(b['last_input_age_s']) for b in beats[n_beats:]
                            if int(b['clouds_received']) >= i + 1), float('nan'))
            tf_s = (tf_arrivals[key] - stamp_ns) / 1e9 if got_tf else float('nan')
            rows.append({'cloud': i, 'bytes': len(msg.data), 'callback_age_s': age,
                         'tf_latency_s': tf_s, 'publish_cpu_s': publish_s})
            print(f'cloud {i}: {len(msg.data)} bytes, publish -> callback {1e3 * age:.1f} ms, '
                  f'publish -> tf {tf_s:.2f} s', flush=True)
            time.sleep(args.gap_s)
    finally:
        executor.shutdown()
        probe.destroy_node()
        rclpy.try_shutdown()
        node_proc.terminate()
        node_proc.wait(15)
    ages = [r['callback_age_s'] for r in rows if r['callback_age_s'] == r['callback_age_s']]
    tfs = [r['tf_latency_s'] for r in rows if r['tf_latency_s'] == r['tf_latency_s']]
    summary = {'phase': args.phase, 'preset': args.preset,
               'clouds': len(rows), 'delivered': len(ages), 'registered': len(tfs),
               'callback_median_ms': 1e3 * statistics.median(ages) if ages else None,
               'callback_p90_ms': (1e3 * statistics.quantiles(ages, n=10)[-1]
                                   if len(ages) > 1 else None),
               'callback_max_ms': 1e3 * max(ages) if ages else None,
               'tf_median_s': statistics.median(tfs) if tfs else None,
               'load_average': os.getloadavg()}
    print(json.dumps(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({'summary': summary, 'rows': rows}, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

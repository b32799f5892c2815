"""Run node executables as child processes and watch them from a probe node of the test.

Shared by the cross-process tests (test_integration, test_fuzz): the nodes run from their
console scripts with the package's params files, over real DDS, in the session's domain.
"""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import threading
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import String
from tf2_msgs.msg import TFMessage

from neural_bone_reg.ros.qos import DIAGNOSTICS_QOS, LATCHED_QOS
from neural_bone_reg.ros.tf_compat import DYNAMIC_LISTENER_QOS
from ros_test_support import (Collector, find_executable, find_status, MESSAGE_TIMEOUT_S,
                              status_values)

#: Node start-up (imports torch) plus loading a cached model.
START_TIMEOUT_S = 60.0
#: How long a node gets to exit after SIGINT.
EXIT_TIMEOUT_S = 15.0
#: Times a cloud is sent before a test gives up on its delivery.
DELIVERY_ATTEMPTS = 5
#: Characters of a node's log shown in a failure message.
LOG_TAIL_CHARS = 4000


class NodeProcess:
    """One node executable running as a child process, with its output in a log file."""

    def __init__(self, executable: str, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, 'wb')
        self.popen = subprocess.Popen([find_executable(executable), *args], stdout=self._log,
                                      stderr=subprocess.STDOUT, env=dict(os.environ))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors='replace')[-LOG_TAIL_CHARS:]

    def stop(self) -> Optional[int]:
        """Send SIGINT, wait, kill if needed; return the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(EXIT_TIMEOUT_S)
        self._log.close()
        return self.popen.returncode


class Probe:
    """A test node in its own context, spinning in a thread, with collectors."""

    def __init__(self, name: str = 'integration_probe') -> None:
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        self.diags = Collector(self.node, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
        self.tf = Collector(self.node, TFMessage, '/tf', DYNAMIC_LISTENER_QOS)
        self.models = Collector(self.node, String, '/model', LATCHED_QOS)

    def close(self) -> None:
        self.executor.shutdown()
        self._thread.join(MESSAGE_TIMEOUT_S)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def wait_diag(self, name_part: str, timeout_s: float, frame_id: Optional[str] = None,
                  level: Optional[bytes] = None, start: int = 0) -> Any:
        array = self.diags.wait_for(
            lambda a: find_status(a, name_part, frame_id, level) is not None, timeout_s, start)
        return None if array is None else find_status(array, name_part, frame_id, level)

    def wait_tf(self, parent: str, child: str, timeout_s: float,
                stamp: Optional[Any] = None) -> Any:
        def match(transform: Any) -> bool:
            return (transform.header.frame_id == parent and transform.child_frame_id == child
                    and (stamp is None or (transform.header.stamp.sec, transform.header.stamp
                                           .nanosec) == (stamp.sec, stamp.nanosec)))
        msg = self.tf.wait_for(lambda m: any(match(t) for t in m.transforms), timeout_s)
        return None if msg is None else next(t for t in msg.transforms if match(t))

    @staticmethod
    def _counters(array: Any, node_name: str) -> Optional[dict[str, str]]:
        """Return the heartbeat counters in a DiagnosticArray, or None if it is not one."""
        status = find_status(array, f'{node_name}: model')
        values = None if status is None else status_values(status)
        return values if values is not None and 'clouds_received' in values else None

    def heartbeat(self, node_name: str) -> dict[str, str]:
        """Return the counters of the node's newest heartbeat ({} before the first)."""
        for array in reversed(list(self.diags.messages)):
            values = self._counters(array, node_name)
            if values is not None:
                return values
        return {}

    def next_heartbeat(self, node_name: str, timeout_s: float = MESSAGE_TIMEOUT_S
                       ) -> dict[str, str]:
        """Wait for the node's next heartbeat and return its counters ({} on timeout)."""
        start = self.diags.count()
        array = self.diags.wait_for(lambda a: self._counters(a, node_name) is not None,
                                    timeout_s, start)
        return {} if array is None else self._counters(array, node_name)

    def clouds_received(self, node_name: str) -> int:
        """Return the node's clouds_received counter from its newest heartbeat (-1: none)."""
        return int(self.heartbeat(node_name).get('clouds_received', -1))

    def deliver(self, node_name: str, pub: Any, msg: Any) -> None:
        """Publish a cloud until the node's heartbeat counts it (or give up)."""
        before = self.clouds_received(node_name)
        for _ in range(DELIVERY_ATTEMPTS):
            pub.publish(msg)
            # Heartbeats come once a second; two of them without the count rising: resend.
            for _ in range(2):
                start = self.diags.count()
                if self.diags.wait_for(
                        lambda a: find_status(a, f'{node_name}: model') is not None,
                        MESSAGE_TIMEOUT_S, start) is None:
                    return
                if self.clouds_received(node_name) > before:
                    return

    def parents_seen(self) -> set[str]:
        return {t.header.frame_id for m in list(self.tf.messages) for t in m.transforms}

"""Shared helpers of the node tests: small configs, the shared phantom model, topic collectors.

The phantom's distance field is trained once per test session with a small config (about a
minute on two CPU cores) into a cache folder under pytest's session temp dir; every test and
every node started by a test loads it from there (same mesh sha256 + config = cache hit).
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import sys
import threading
import time
from typing import Any, Callable, Generic, Optional, TypeVar

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / 'config'

#: A small UDF and training run: enough for the phantom at the 2 mm / 2 deg level.
TEST_UDF = {'hidden_dim': 64}
TEST_TRAIN = {'iterations': 300, 'num_samples': 30_000, 'num_surface_points': 5_000,
              'grid_voxel_mm': 2.0}
#: A small registration search: a few seconds per cloud on two CPU cores (256 hypotheses
#: missed the integration sweep's optimum, 42 deg off; the gates refused it). Its small UDF (a
#: 2 mm grid of a 64-wide MLP trained 300 steps) blurs how much better the true pose fits than
#: the best alternative, so these plumbing tests ask for 3 standard errors rather than the
#: default's 6; the gates themselves are tested in test/core on the full-size field.
TEST_REGISTRATION = {'num_hypotheses': 512, 'fine_top_k': 16, 'final_candidates': 4,
                     'coarse_iterations': 40, 'fine_iterations': 30, 'fine_points': 512,
                     'gate_min_uniqueness_z': 3.0}
#: Seconds to wait for anything that involves a registration solve.
SOLVE_TIMEOUT_S = 90.0
#: Seconds to wait for plain message delivery.
MESSAGE_TIMEOUT_S = 10.0

M = TypeVar('M')


def small_configs() -> Any:
    """Return the Configs used by every test node (preset 'fast' plus TEST_REGISTRATION)."""
    from neural_bone_reg.core.config import configs_from_dict

    return configs_from_dict({'udf': TEST_UDF, 'train': TEST_TRAIN,
                              'registration': TEST_REGISTRATION}, preset='fast')


def shared_cache_dir(base: Path) -> Path:
    """Return the session's model cache folder (NEURAL_BONE_REG_TEST_CACHE overrides it)."""
    folder = Path(os.environ.get('NEURAL_BONE_REG_TEST_CACHE') or base / 'nbr_model_cache')
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def trained_phantom(cache_dir: Path) -> Any:
    """Return a BoneRegistrar of the phantom, trained into (or loaded from) ``cache_dir``."""
    from neural_bone_reg import BoneRegistrar
    from neural_bone_reg.core import sim

    configs = small_configs()
    return BoneRegistrar.from_mesh(sim.phantom_mesh_path(cache_dir), cache_dir=cache_dir,
                                   configs=configs)


def flat_parameters(configs: Any, sections: tuple[str, ...]) -> dict[str, Any]:
    """Return ``{'section': {field: value}}`` of the configs, as a params-file section."""
    from neural_bone_reg.core.config import as_dict

    return {section: as_dict(getattr(configs, section)) for section in sections}


def write_params_file(path: Path, values: dict[str, Any]) -> Path:
    """Write a ROS 2 params file applying ``values`` (nested dict) to every node."""
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}))
    return path


def find_executable(name: str) -> Optional[str]:
    """Return the installed console script ``name``: colcon lib/ dir, the venv, then PATH."""
    candidates = [Path(sys.prefix) / 'lib' / 'neural_bone_reg' / name,
                  Path(sys.prefix) / 'bin' / name,
                  Path(sys.executable).parent / name]
    prefix = os.environ.get('AMENT_PREFIX_PATH', '')
    candidates += [Path(p) / 'lib' / 'neural_bone_reg' / name for p in prefix.split(os.pathsep)
                   if p]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


class Collector(Generic[M]):
    """Subscribe to a topic and keep every message; wait for one matching a predicate."""

    def __init__(self, node: Any, msg_type: type, topic: str, qos: Any) -> None:
        """Create the subscription on ``node`` (which must be spun elsewhere)."""
        self.messages: list[M] = []
        self._cond = threading.Condition()
        self._sub = node.create_subscription(msg_type, topic, self.on_message, qos)

    def on_message(self, msg: M) -> None:
        """Store a message and wake waiters."""
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[M], bool], timeout_s: float,
                 start: int = 0) -> Optional[M]:
        """Return the first message from index ``start`` on that matches, or None on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for msg in self.messages[start:]:
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def count(self) -> int:
        """Return how many messages arrived so far."""
        with self._cond:
            return len(self.messages)


def matched_publisher(node: Any, msg_type: type, topic: str, qos: Any, subscribers: int = 1,
                      timeout_s: float = MESSAGE_TIMEOUT_S) -> Any:
    """Create a publisher and wait until it matches ``subscribers`` subscriptions.

    A volatile message published before discovery completes is lost; this waits on the
    publisher's matched event (``node`` must be spun elsewhere). It returns the publisher
    even on timeout, so the test fails on the missing message with its own explanation.
    """
    from rclpy.event_handler import PublisherEventCallbacks

    matched = threading.Event()

    def on_matched(info: Any) -> None:
        if info.current_count >= subscribers:
            matched.set()

    pub = node.create_publisher(msg_type, topic, qos,
                                event_callbacks=PublisherEventCallbacks(matched=on_matched))
    if pub.get_subscription_count() < subscribers:
        matched.wait(timeout_s)
    return pub


def status_values(status: Any) -> dict[str, str]:
    """Return a DiagnosticStatus's key/value pairs as a dict."""
    return {kv.key: kv.value for kv in status.values}


def find_status(array: Any, name_part: str, frame_id: Optional[str] = None,
                level: Optional[bytes] = None) -> Any:
    """Return the status of a DiagnosticArray whose name has ``name_part`` (and frame/level)."""
    for status in array.status:
        if name_part not in status.name:
            continue
        if frame_id is not None and status_values(status).get('frame_id') != frame_id:
            continue
        if level is not None and status.level != level:
            continue
        return status
    return None


def wait_for_status(diags: Collector, name_part: str, level: bytes, timeout_s: float) -> Any:
    """Return the first status of ``diags`` named with ``name_part`` at ``level``, or None."""
    array = diags.wait_for(lambda a: find_status(a, name_part, level=level) is not None,
                           timeout_s)
    return None if array is None else find_status(array, name_part, level=level)


def rotation_error_deg(r_a: np.ndarray, r_b: np.ndarray) -> float:
    """Return the angle of ``r_a^T r_b`` in degrees."""
    cos = (np.trace(r_a.T @ r_b) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

"""The registration node's own parameters (frames, model source, QoS, threads), and checks.

The config sections (``sweep.*``, ``track.*``, ``registration.*``, ``udf.*``, ``train.*``)
are declared from the core dataclasses by ``ros.params``; this module declares the rest with
their descriptors and checks what a descriptor cannot (choices, frame names).
"""

from __future__ import annotations

from typing import Any

from rclpy.node import Node

from neural_bone_reg.core.runtime import MAX_THREADS
from neural_bone_reg.ros import input_checks
from neural_bone_reg.ros.params import declare, format_configs
from neural_bone_reg.ros.qos import (DEFAULT_CLOUD_DEPTH, DEFAULT_CLOUD_HISTORY,
                                     DEFAULT_CLOUD_RELIABILITY, MAX_CLOUD_DEPTH)

DEVICES = ('auto', 'cpu', 'cuda')
#: Default and largest wait for a tf lookup of a cloud in another frame than robot_frame, s.
DEFAULT_TF_TIMEOUT_S = 0.2
MAX_TF_TIMEOUT_S = 10.0
#: Hard upper bound of the max_cloud_points parameter.
MAX_CLOUD_POINTS_LIMIT = 100_000_000


def declare_node_parameters(node: Node) -> None:
    """Declare the node's own parameters, with descriptions, ranges and read-only flags."""
    declare(node, 'mode', 'sweep',
            "'sweep': accumulate the slices of a probe sweep and register the sweep; "
            "'single': register each cloud on its own; 'track': register the first cloud, "
            'then follow the bone frame to frame from the last accepted pose (video rate), '
            'falling back to a full registration whenever a frame fails the gates.')
    declare(node, 'robot_frame', '',
            "Parent frame of the broadcast transform; '' uses each cloud's frame_id. "
            'A cloud in another frame is transformed into it at its stamp (tf2_ros).')
    declare(node, 'tf_timeout_s', DEFAULT_TF_TIMEOUT_S,
            'Longest wait for the tf of a cloud in another frame than robot_frame, at the '
            'cloud stamp, s (in the worker); on timeout that cloud gives no transform.',
            value_range=(0.0, MAX_TF_TIMEOUT_S))
    declare(node, 'bone_frame', '',
            "Child frame of the broadcast transform; '' takes the model's bone_frame "
            "(or 'bone' for a model loaded from a parameter).")
    declare(node, 'checkpoint', '',
            'UDF checkpoint to load at start; empty waits for the model topic.', read_only=True)
    declare(node, 'mesh_path', '',
            'Bone mesh (mm) to train or load from cache_dir at start, if no checkpoint.',
            read_only=True)
    declare(node, 'cache_dir', '',
            "Checkpoint cache folder for mesh_path; '' uses the package default.",
            read_only=True)
    declare(node, 'device', 'auto', "Torch device: 'auto', 'cpu' or 'cuda'.", read_only=True)
    declare(node, 'preset', 'default',
            'Registration preset (default, paper, fast); registration.* parameters left '
            'at their defaults at start take the preset value (one set at runtime is used '
            'as set, even to the default).', read_only=True)
    declare(node, 'max_cloud_points', 2_000_000,
            'Clouds with more points (width x height) are rejected before conversion.',
            value_range=(1, MAX_CLOUD_POINTS_LIMIT))
    declare(node, 'cloud_qos.reliability', DEFAULT_CLOUD_RELIABILITY,
            "QoS reliability of the cloud subscription: 'reliable' (matches reliable "
            'publishers only; delivered every cloud up to 24 MB across processes) or '
            "'best_effort' (matches every publisher; across processes Fast DDS delivered "
            'clouds of 0.3 MB but rarely or never larger ones; see the README). Read-only.',
            read_only=True)
    declare(node, 'cloud_qos.history', DEFAULT_CLOUD_HISTORY,
            "QoS history of the cloud subscription: 'keep_last' (cloud_qos.depth clouds) or "
            "'keep_all'. Read-only.", read_only=True)
    declare(node, 'cloud_qos.depth', DEFAULT_CLOUD_DEPTH,
            'QoS depth of the cloud subscription (keep_last): clouds held before the '
            'callback takes them. Read-only.', value_range=(1, MAX_CLOUD_DEPTH), read_only=True)
    declare(node, 'threads.intra_op', 0,
            'Torch intra-op threads of the solver; 0 = auto (half the CPUs available, 1-4). '
            'Read-only.', value_range=(0, MAX_THREADS), read_only=True)
    declare(node, 'threads.inter_op', 0,
            'Torch inter-op threads; 0 = auto (1: the solver runs one graph at a time). '
            'Read-only.', value_range=(0, MAX_THREADS), read_only=True)


def check_frames(robot_frame: str, bone_frame: str, model_bone_frame: str = '') -> None:
    """Raise ValueError for frame parameters tf cannot take, or a bone frame = robot frame.

    The bone frame in effect is the ``bone_frame`` parameter, else ``model_bone_frame`` (the
    model's): neither may be ``robot_frame``.
    """
    input_checks.check_frame_id(robot_frame, 'parameter robot_frame')
    input_checks.check_frame_id(bone_frame, 'parameter bone_frame')
    if bone_frame and input_checks.tf_frame(robot_frame) == input_checks.tf_frame(bone_frame):
        raise ValueError(f'parameters robot_frame and bone_frame are both {robot_frame!r}; '
                         'expected different frames (a frame cannot be registered to itself)')
    if (not bone_frame and robot_frame and model_bone_frame
            and input_checks.tf_frame(robot_frame) == input_checks.tf_frame(model_bone_frame)):
        raise ValueError(f"the model's bone_frame {model_bone_frame!r} is robot_frame; expected "
                         'another frame (set the bone_frame parameter: a frame cannot be '
                         'registered to itself)')


def checked_choice(node: Node, name: str, choices: tuple[str, ...]) -> str:
    """Return a string parameter, or raise ValueError naming it when it is not a choice."""
    value = node.get_parameter(name).value
    if value not in choices:
        raise ValueError(f'parameter {name!r} must be one of {choices}, got {value!r}')
    return value


def resolve_device(name: str) -> str | None:
    """Return the torch device of the ``device`` parameter (None: auto); check 'cuda'."""
    if name == 'cuda':
        import torch
        if not torch.cuda.is_available():
            raise ValueError("parameter 'device' is 'cuda' but torch sees no CUDA device")
    return None if name == 'auto' else name


#: The node's own parameters logged (with the mode, device and preset) at start.
LOGGED = ('robot_frame', 'bone_frame', 'max_cloud_points', 'tf_timeout_s',
          'cloud_qos.reliability', 'cloud_qos.history', 'cloud_qos.depth')


def in_use_text(node: Node, threads: tuple[int, int], configs: dict[str, Any]) -> str:
    """Return the values in use, for the log at start: parameters, threads and configs."""
    return (' '.join(f'{name}={node.get_parameter(name).value!r}'
                     for name in ('mode', 'device', 'preset', *LOGGED))
            + f' threads.intra_op={threads[0]} threads.inter_op={threads[1]} (in use)\n'
            + format_configs(configs, tuple(configs)))

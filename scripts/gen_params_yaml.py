#!/usr/bin/env python3
"""Write config/preop_loader.yaml and config/registration_node.yaml from the core configs.

The node-specific part of each file is kept here; the udf/train/registration sections are
generated from the dataclasses in neural_bone_reg.core.config (defaults, and the doc, range
and unit each field declares in its metadata), as are the registration node's sweep.* and
track.* sections, so the files never drift from the core. Run it after
adding or changing a config field: `.venv/bin/python scripts/gen_params_yaml.py`.
test/ros/test_nodes.py fails when the files are out of date.
"""

import dataclasses
from pathlib import Path
import textwrap

from neural_bone_reg.ros.params import field_docs, parameter_range, SECTIONS

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'config'
WIDTH = 99

PREOP_LOADER_HEAD = """\
# Parameters of the preop_loader node (neural_bone_reg). Load with
#   preop_loader --ros-args --params-file config/preop_loader.yaml
# Lengths are in mm. udf.* and train.* mirror neural_bone_reg.core.config.UdfConfig and
# TrainConfig; together with the mesh's sha256 they key the checkpoint cache, so the CLI
# (`neural-bone-reg train`) and this node share trained models when these values agree.
/**:
  ros__parameters:
    # Preoperative bone surface mesh (STL, PLY or OBJ) in mm. Required. The literal value
    # 'phantom' selects the embedded phantom proximal femur (for demos and tests). Read-only.
    mesh_path: 'phantom'
    # tf frame of the mesh; announced on the model topic, used as child frame of the
    # registration. Read-only.
    bone_frame: 'bone'
    # Checkpoint cache folder; '' uses $NEURAL_BONE_REG_CACHE or ~/.cache/neural_bone_reg.
    # Read-only.
    cache_dir: ''
    # Torch device for training: 'auto' (CUDA when present), 'cpu' or 'cuda'. Read-only.
    device: 'auto'
    # Configure and activate on start without a lifecycle manager. Set false to drive the
    # lifecycle with `ros2 lifecycle set` or a lifecycle manager. Read-only.
    autostart: true
    threads:
      # Torch intra-op threads for training; 0 = auto (half the CPUs available, 1-4).
      # Range [0, 256]. Read-only.
      intra_op: 0
      # Torch inter-op threads; 0 = auto (1). Range [0, 256]. Read-only.
      inter_op: 0
"""

REGISTRATION_NODE_HEAD = """\
# Parameters of the registration_node (neural_bone_reg). Load with
#   registration_node --ros-args --params-file config/registration_node.yaml -r points:=<topic>
# Clouds and tf are in metres on the wire (REP 103); the core and every *_mm value here are
# in mm. registration.* mirrors neural_bone_reg.core.config.RegistrationConfig; udf.* and
# train.* matter only when this node trains from mesh_path itself, at start (read-only).
/**:
  ros__parameters:
    # 'sweep': accumulate the slices of a probe sweep and register the whole sweep (tracked
    # ultrasound); 'single': register each cloud on its own (RGB-D); 'track': register the
    # first cloud, then follow the bone frame to frame from the last accepted pose at video
    # rate (RGB-D), falling back to a full registration whenever a frame fails the gates.
    mode: 'sweep'
    # Parent frame of the broadcast transform and of bone_pose; '' uses each cloud's
    # header.frame_id. A cloud in another frame is transformed into robot_frame at its header
    # stamp with tf2_ros (each sweep slice at its own), in the worker; a failed lookup, or a
    # missing tf2_ros, is reported on /diagnostics and that cloud gives no transform.
    # Outputs, accepted results only: tf robot_frame -> bone_frame, and bone_pose
    # (geometry_msgs/PoseWithCovarianceStamped: the same pose with its 6x6 covariance, m and
    # rad, row-major over x, y, z and rotations about the parent's X, Y, Z), published
    # reliable and transient local, depth 1: a result that a planner reads once, possibly
    # after it was published, so a late subscriber still gets the latest.
    robot_frame: ''
    # Longest wait for the tf of a cloud in another frame than robot_frame, at the cloud
    # stamp, s; on timeout that cloud gives no transform. Range [0.0, 10.0].
    tf_timeout_s: 0.2
    # Child frame of the broadcast transform; '' takes bone_frame from the model message
    # ('bone' for a model given by parameter).
    bone_frame: ''
    # UDF checkpoint to load at start; '' waits for the preop loader's latched model topic.
    # Read-only.
    checkpoint: ''
    # Bone mesh (mm) to train or load from cache_dir at start when no checkpoint is given;
    # 'phantom' is not special here. Read-only.
    mesh_path: ''
    # Checkpoint cache folder for mesh_path; '' uses the package default. Read-only.
    cache_dir: ''
    # Torch device: 'auto' (CUDA when present), 'cpu' or 'cuda'. Read-only.
    device: 'auto'
    # Registration preset: 'default', 'paper' or 'fast'. registration.* values left at the
    # dataclass defaults take the preset's values (one set at runtime is used as set, even
    # to the default). Read-only.
    preset: 'default'
    # Clouds declaring more points than this (width x height) are rejected before conversion.
    # Range [1, 100000000].
    max_cloud_points: 2000000
"""

REGISTRATION_NODE_TAIL = """\
    cloud_qos:
      # QoS reliability of the cloud subscription, 'reliable' or 'best_effort'. Reliable
      # matches reliable publishers only (a best-effort one is reported on /diagnostics as
      # incompatible and counted in the heartbeat); best effort matches every publisher but
      # loses large clouds. Measured across processes on one host (Fast DDS 3.2.3, shared
      # memory; benchmarks/bench_cloud_qos.py, 8 tries a size): reliable delivered every cloud
      # of 0.3-24 MB (5 MB in 35-80 ms); best_effort delivered every 0.3 MB cloud but only 3
      # of 96 larger ones (0.6-24 MB, from best-effort or reliable publishers). A 640 x 480
      # RGB-D cloud is 4.9 MB. Read-only.
      reliability: 'reliable'
      # QoS history of the cloud subscription, 'keep_last' (depth clouds) or 'keep_all'
      # (both delivered every size above with a reliable publisher). Read-only.
      history: 'keep_last'
      # QoS depth (keep_last): clouds held until the callback takes them; the node solves only
      # the newest. Range [1, 1000]. Read-only.
      depth: 5
    threads:
      # Torch intra-op threads of the solver; 0 = auto (half the CPUs available, 1-4).
      # Range [0, 256]. Read-only.
      intra_op: 0
      # Torch inter-op threads; 0 = auto (1: the solver runs one graph at a time).
      # Range [0, 256]. Read-only.
      inter_op: 0
"""


def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return '[' + ', '.join(repr(float(v)) for v in value) + ']'
    return repr(value)


def section_yaml(name: str, indent: str = '    ') -> str:
    """Return one commented config section of a params file."""
    cls = SECTIONS[name]
    docs = field_docs(cls)
    defaults = cls()
    lines = [f'{indent}{name}:']
    for field in dataclasses.fields(cls):
        value = getattr(defaults, field.name)
        comment = docs.get(field.name, field.name)
        bounds = parameter_range(name, field.name, value)
        unit = field.metadata.get('unit', '')
        if bounds is not None:
            comment += f' Range [{bounds[0]:g}, {bounds[1]:g}]' + (f' {unit}.' if unit else '.')
        elif unit:
            comment += f' Unit: {unit}.'
        for line in textwrap.wrap(comment, WIDTH - len(indent) - 4):
            lines.append(f'{indent}  # {line}')
        lines.append(f'{indent}  {field.name}: {_yaml_value(value)}')
    return '\n'.join(lines) + '\n'


def params_files() -> dict[str, str]:
    """Return ``{file name: text}`` of both params files."""
    return {
        'preop_loader.yaml': PREOP_LOADER_HEAD + section_yaml('udf') + section_yaml('train'),
        'registration_node.yaml': (
            REGISTRATION_NODE_HEAD + section_yaml('sweep') + section_yaml('track')
            + REGISTRATION_NODE_TAIL + section_yaml('registration') + section_yaml('udf')
            + section_yaml('train')),
    }


def main(folder: Path = CONFIG_DIR) -> None:
    """Write both params files into ``folder``."""
    for name, text in params_files().items():
        (folder / name).write_text(text)


if __name__ == '__main__':
    main()

"""launch_pytest test of launch/neural_bone_reg.launch.py, for a real ROS 2 install.

launch, launch_ros and launch_pytest are not on PyPI, so this module skips where they cannot
be imported (the PyPI-wheel venv of `make setup`); test_integration.py runs the same scenario
there by starting the installed executables with the same params files. On a ROS 2 install
(colcon build, source install/setup.bash) it launches the package's launch file with small
params files, publishes a simulated sweep and waits for the bone pose on tf.

launch_pytest 3.7 (Kilted) fails to collect any test under pytest 8.4 or later
(``'FixtureFunctionDefinition' object has no attribute '_pytestfixturefunction'``,
ros2/launch#947): run it with the distro's pytest.
"""

from __future__ import annotations

from pathlib import Path
import threading
import time

import numpy as np
import pytest
import rclpy
from sensor_msgs.msg import PointCloud2

from neural_bone_reg.core import sim
from neural_bone_reg.core.se3 import apply_transform
from neural_bone_reg.ros.conversions import transform_stamped_to_matrix, xyz_to_cloud
from neural_bone_reg.ros.qos import CLOUD_PUBLISHER_QOS
from neural_bone_reg.ros.tf_compat import TfWaiter
from ros_test_support import (flat_parameters, rotation_error_deg, shared_cache_dir,
                              small_configs, SOLVE_TIMEOUT_S, trained_phantom,
                              write_params_file)

try:
    from launch import LaunchDescription
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from launch.substitutions import PathJoinSubstitution
    import launch_pytest
    from launch_ros.substitutions import FindPackageShare
except ImportError as exc:
    pytest.skip(f'launch_pytest is not importable ({exc}): launch and launch_ros are not on '
                'PyPI; test_integration.py covers the same scenario here',
                allow_module_level=True)

ROBOT_FRAME = 'robot_base'
CLOUD_TOPIC = '/launch_test/points'
#: Model loading, discovery and solving, on a CPU.
TF_TIMEOUT_S = SOLVE_TIMEOUT_S + 60.0
CLOUD_PERIOD_S = 0.5


@pytest.fixture(autouse=True)
def launch_plugin_loaded(request: pytest.FixtureRequest) -> None:
    """Skip, saying why, where launch_pytest imports but its pytest plugin is not loaded.

    Without the plugin the test would run as a plain function, launch nothing and time out.
    An installed launch_pytest registers it (entry point ``pytest11``); one on PYTHONPATH does not.
    """
    manager = request.config.pluginmanager
    if not any(manager.has_plugin(name) for name in ('launch_pytest', 'launch_pytest.plugin')):
        pytest.skip('launch_pytest is importable but its pytest plugin is not loaded: install '
                    'it, or run pytest -p launch_pytest.plugin')


@pytest.fixture(scope='module')
def params_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train the phantom (session cache) and write small params files for both nodes."""
    cache = shared_cache_dir(tmp_path_factory.getbasetemp())
    trained_phantom(cache)
    work = tmp_path_factory.mktemp('launch')
    configs = small_configs()
    return {
        'preop': write_params_file(work / 'preop.yaml', {
            'mesh_path': 'phantom', 'cache_dir': str(cache),
            **flat_parameters(configs, ('udf', 'train'))}),
        'registration': write_params_file(work / 'registration.yaml', {
            'preset': 'fast', 'mode': 'single', **flat_parameters(configs, ('registration',))}),
    }


@launch_pytest.fixture
def launch_description(params_files: dict[str, Path]) -> LaunchDescription:
    """Include the package's launch file with the test params files."""
    launch_file = PathJoinSubstitution([FindPackageShare('neural_bone_reg'), 'launch',
                                        'neural_bone_reg.launch.py'])
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file), launch_arguments={
            'mesh': 'phantom', 'cloud_topic': CLOUD_TOPIC, 'robot_frame': ROBOT_FRAME,
            'bone_frame': 'bone', 'device': 'cpu', 'mode': 'single',
            'preop_params_file': str(params_files['preop']),
            'registration_params_file': str(params_files['registration']),
        }.items()),
        launch_pytest.actions.ReadyToTest(),
    ])


@pytest.mark.launch(fixture=launch_description)
def test_launched_nodes_broadcast_the_bone_pose() -> None:
    rclpy.init()
    node = rclpy.create_node('launch_test_probe')
    spinner = threading.Thread(target=lambda: rclpy.spin(node), daemon=True)
    spinner.start()
    try:
        rng = np.random.default_rng(5)
        pose = sim.random_pose(rng)
        cloud = apply_transform(pose, np.vstack(sim.simulate_sweep(sim.make_phantom_mesh(), rng)))
        waiter = TfWaiter(node, ROBOT_FRAME, 'bone')
        # Reliable, as the node's default cloud subscription (a best-effort publisher is
        # incompatible with it: the node says so and no cloud arrives).
        pub = node.create_publisher(PointCloud2, CLOUD_TOPIC, CLOUD_PUBLISHER_QOS)
        deadline = time.monotonic() + TF_TIMEOUT_S
        transform = None
        # Repeat the cloud until the model is loaded and a pose comes back (best-effort input).
        while transform is None and time.monotonic() < deadline:
            pub.publish(xyz_to_cloud(cloud, ROBOT_FRAME, time.time_ns()))
            transform = waiter.wait(CLOUD_PERIOD_S)
        assert transform is not None, 'no bone pose on tf'
        estimate = transform_stamped_to_matrix(transform)
        assert rotation_error_deg(estimate[:3, :3], pose[:3, :3]) < 2.0
        assert np.linalg.norm(estimate[:3, 3] - pose[:3, 3]) < 2.0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()

"""Launch the preop loader and the registration node with the package's parameter files.

    ros2 launch neural_bone_reg neural_bone_reg.launch.py mesh:=/data/femur.stl \
        cloud_topic:=/us/points robot_frame:=robot_base

The preop loader trains (or loads from its cache) the bone model and announces it on the
latched ``model`` topic; the registration node picks it up, registers the clouds on
``cloud_topic`` and broadcasts ``robot_frame -> bone_frame`` on tf for accepted results only.
The preop loader is a lifecycle node that configures and activates itself (its ``autostart``
parameter); set autostart to false in its params file to drive it with a lifecycle manager.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'neural_bone_reg'


def _arg(name: str, default: str, description: str) -> DeclareLaunchArgument:
    return DeclareLaunchArgument(name, default_value=default, description=description)


def _str(name: str) -> ParameterValue:
    """Return a launch argument as a string parameter ('' must stay a string, not null)."""
    return ParameterValue(LaunchConfiguration(name), value_type=str)


def generate_launch_description() -> LaunchDescription:
    """Return the launch description of the two nodes."""
    config = PathJoinSubstitution([FindPackageShare(PACKAGE), 'config'])
    use_sim_time = ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool)
    return LaunchDescription([
        _arg('mesh', 'phantom',
             "Preoperative bone mesh (STL/PLY/OBJ, mm); 'phantom' = the embedded phantom femur."),
        _arg('cloud_topic', '/us/points', 'sensor_msgs/PointCloud2 input topic (metres).'),
        _arg('robot_frame', '',
             "Parent frame of the broadcast transform; '' = each cloud's frame_id. Clouds in "
             'another frame are transformed into it by tf at their stamps.'),
        _arg('bone_frame', 'bone', 'Child frame of the broadcast transform (the mesh frame).'),
        _arg('device', 'auto', "Torch device: 'auto', 'cpu' or 'cuda'."),
        _arg('mode', 'sweep', "'sweep' (accumulate a probe sweep), 'single' (each cloud) or "
             "'track' (register once, then follow frame to frame at video rate)."),
        _arg('use_sim_time', 'false', 'Use /clock (e.g. when replaying a bag with --clock).'),
        _arg('preop_params_file', PathJoinSubstitution([config, 'preop_loader.yaml']),
             'Parameter file of the preop loader.'),
        _arg('registration_params_file',
             PathJoinSubstitution([config, 'registration_node.yaml']),
             'Parameter file of the registration node.'),
        Node(
            package=PACKAGE, executable='preop_loader', name='preop_loader', output='screen',
            parameters=[LaunchConfiguration('preop_params_file'), {
                'mesh_path': _str('mesh'),
                'bone_frame': _str('bone_frame'),
                'device': _str('device'),
                'use_sim_time': use_sim_time,
            }]),
        Node(
            package=PACKAGE, executable='registration_node', name='registration_node',
            output='screen',
            parameters=[LaunchConfiguration('registration_params_file'), {
                'robot_frame': _str('robot_frame'),
                'bone_frame': _str('bone_frame'),
                'device': _str('device'),
                'mode': _str('mode'),
                'use_sim_time': use_sim_time,
            }],
            remappings=[('points', LaunchConfiguration('cloud_topic'))]),
    ])

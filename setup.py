"""Install neural_bone_reg as an ament_python package (colcon) or with pip."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'neural_bone_reg'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages('src'),
    package_dir={'': 'src'},
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml')),
    ],
    python_requires='>=3.10',
    # torch is deliberately unpinned: CUDA users bring their own build. `make setup` pins the
    # local CPU wheel. rclpy and the message packages come from ROS 2 (apt) or the PyPI wheels.
    install_requires=[
        'numpy>=1.23',
        'scipy>=1.10',
        'torch>=2.1',
        'trimesh>=4.0',
        'libigl>=2.5',
        'manifold3d>=2.3',
        'rtree>=1.0',
        'pyyaml>=6.0',
        'tqdm>=4.60',
        'matplotlib>=3.6',
    ],
    extras_require={
        'bag': ['rosbags>=0.10'],
        'test': ['pytest>=7'],
    },
    zip_safe=True,
    maintainer='neural_bone_reg developers',
    maintainer_email='dev@neural-bone-reg.invalid',
    description='Neural UDF + multi-hypothesis rigid registration of bone surfaces, for ROS 2.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'neural-bone-reg = neural_bone_reg.cli.main:main',
            'preop_loader = neural_bone_reg.ros.preop_loader:main',
            'registration_node = neural_bone_reg.ros.registration_node:main',
        ],
    },
)

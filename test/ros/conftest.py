"""Fixtures for the ROS tests: a private DDS domain, an rclpy context and a spinning executor.

Every test here runs over real DDS inside one process. The session draws a random
``ROS_DOMAIN_ID`` and restricts discovery to this host before any context exists, so that
parallel test runs (and anything else on the machine) never see each other's topics.
"""

from __future__ import annotations

import os
import random
import threading
from typing import Callable, Iterator, TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from rclpy.context import Context
    from rclpy.node import Node

try:
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
except ImportError:
    rclpy = None
    MultiThreadedExecutor = object

#: Why every test module here is skipped where rclpy is missing.
NO_RCLPY_REASON = 'rclpy is not importable: use a ROS 2 install or `make setup` (PyPI wheels)'

if rclpy is None:
    class _SkippedModule(pytest.Module):
        """A test module collected as one skip, before its ROS imports can fail."""

        def collect(self):
            pytest.skip(NO_RCLPY_REASON)

    def pytest_pycollect_makemodule(module_path, parent):
        """Collect each test module of this folder as a skip that gives the reason.

        A module-level ``pytest.importorskip`` here would crash runs that name this folder
        (``pytest test/ros``), where this conftest is loaded before collection.
        """
        return _SkippedModule.from_parent(parent, path=module_path)


#: Domain ids the session draws from; Fast DDS ports stay valid up to 232.
DOMAIN_ID_RANGE = (1, 200)
#: How long teardown waits for the executor thread to stop (s).
EXECUTOR_JOIN_TIMEOUT_S = 5.0
_ISOLATION_VARIABLES = ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE')


@pytest.fixture(scope='session', autouse=True)
def ros_domain_id() -> Iterator[int]:
    """Put the session on a random ROS domain with localhost-only discovery; yield the id.

    Child processes started by tests inherit the variables, so they join the same domain.
    """
    saved = {name: os.environ.get(name) for name in _ISOLATION_VARIABLES}
    domain_id = random.SystemRandom().randint(*DOMAIN_ID_RANGE)
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    yield domain_id
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def ros_context(ros_domain_id: int) -> Iterator[Context]:
    """Yield an initialised rclpy context of its own, shut down after the test."""
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        rclpy.try_shutdown(context=context)


class BackgroundExecutor(MultiThreadedExecutor):
    """A MultiThreadedExecutor that spins in a thread of its own from creation until stop()."""

    def __init__(self, context: Context) -> None:
        super().__init__(context=context)
        self._thread = threading.Thread(target=self.spin, name='ros_executor', daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop spinning and wait for the thread to end; calling it again does nothing.

        Destroy nodes only after this: destroying one while the executor builds its wait set
        raises InvalidHandle in the executor thread (rclpy#1355).
        """
        self.shutdown()
        self._thread.join(EXECUTOR_JOIN_TIMEOUT_S)


@pytest.fixture
def ros_executor(ros_context: Context) -> Iterator[BackgroundExecutor]:
    """Yield an executor of ``ros_context`` spinning in a background thread.

    A fixture that destroys nodes it added should call ``ros_executor.stop()`` first.
    """
    executor = BackgroundExecutor(ros_context)
    try:
        yield executor
    finally:
        executor.stop()


@pytest.fixture
def make_node(ros_context: Context,
              ros_executor: BackgroundExecutor) -> Iterator[Callable[..., Node]]:
    """Yield a factory of nodes in ``ros_context``, spun by ``ros_executor``, destroyed after.

    Call it as ``make_node(name, **node_kwargs)``.
    """
    from rclpy.node import Node

    nodes: list[Node] = []

    def factory(name: str, **kwargs) -> Node:
        node = Node(name, context=ros_context, **kwargs)
        nodes.append(node)
        ros_executor.add_node(node)
        return node

    yield factory
    ros_executor.stop()
    for node in reversed(nodes):
        node.destroy_node()


@pytest.fixture
def spin(ros_context: Context,
         ros_executor: BackgroundExecutor) -> Iterator[Callable[[Node], Node]]:
    """Yield ``spin(node)``: add a node to the executor; destroy it after the test."""
    nodes: list[Node] = []

    def add(node: Node) -> Node:
        nodes.append(node)
        ros_executor.add_node(node)
        return node

    yield add
    ros_executor.stop()  # before destroying nodes it spins (rclpy#1355)
    for node in reversed(nodes):
        node.destroy_node()


@pytest.fixture
def probe(make_node: Callable[..., Node]) -> Node:
    """Return a plain node for test publishers and subscribers."""
    return make_node('test_probe')

"""The one ``main()`` of this package's nodes: init, build, spin, and clean shutdown."""

from __future__ import annotations

from typing import Callable

import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import (ExternalShutdownException, MultiThreadedExecutor,
                             SingleThreadedExecutor)
from rclpy.node import Node


def run_node(factory: Callable[[], Node], name: str, args: list[str] | None = None,
             on_start: Callable[[Node], None] | None = None, threads: int = 1) -> int:
    """Spin the node that ``factory`` builds until shutdown; return 2 for invalid parameters.

    ``threads`` > 1 spins a MultiThreadedExecutor of that many threads (callbacks of one
    mutually exclusive group still run one at a time). Uses try/finally rather than
    ``with rclpy.init()`` so it also runs on Humble and Jazzy.
    """
    rclpy.init(args=args)
    node = None
    try:
        try:
            node = factory()
        except (ValueError, ParameterException) as exc:
            rclpy.logging.get_logger(name).fatal(f'invalid parameters: {exc}')
            return 2
        if on_start is not None:
            on_start(node)
        executor = (MultiThreadedExecutor(num_threads=threads) if threads > 1
                    else SingleThreadedExecutor())
        executor.add_node(node)
        try:
            executor.spin()
        finally:
            executor.shutdown()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0

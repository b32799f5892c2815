"""The preop loader's worker lifecycle: an abandoned (stale) worker publishes nothing."""

from __future__ import annotations

from pathlib import Path
import threading
from typing import Any

import numpy as np
import pytest
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

import neural_bone_reg
from neural_bone_reg.core.registrar import BoneRegistrar
from neural_bone_reg.ros import preop_loader
from neural_bone_reg.ros.diagnostics import ERROR
from neural_bone_reg.ros.model_info import decode_model_info

#: The stale worker's join timeout in the test (the node's is 10 s).
JOIN_TIMEOUT_S = 0.2
#: Bound on every wait for a worker thread.
WAIT_S = 30.0


class _FakeRegistrar:
    """What the loader reads from a prepared registrar."""

    def __init__(self, tag: str, folder: Path) -> None:
        self.checkpoint_path = folder / f'udf_{tag}.pt'
        self.geometry_sha256 = tag * 64
        self.surface_points = np.random.default_rng(0).uniform(-50.0, 50.0, (20, 3))


class _SlowThenFast:
    """``from_mesh`` stand-in: the first call blocks (ignoring cancellation, as a checkpoint
    load does) until released, then returns model 'a' or raises; later calls return 'b'."""

    def __init__(self, folder: Path, first_fails: bool = False) -> None:
        self.folder = folder
        self.first_fails = first_fails
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(self, mesh_path: str, **kwargs: Any) -> _FakeRegistrar:
        self.threads.append(threading.current_thread())
        if len(self.threads) == 1:
            assert self.release.wait(WAIT_S)
            if self.first_fails:
                raise RuntimeError('the old worker failed late')
            return _FakeRegistrar('a', self.folder)
        return _FakeRegistrar('b', self.folder)


@pytest.fixture
def loader(ros_context: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Yield a PreopLoader (autostart off) with a short join timeout; destroy it after."""
    monkeypatch.setattr(preop_loader, 'WORKER_JOIN_TIMEOUT_S', JOIN_TIMEOUT_S)
    node = preop_loader.PreopLoader(context=ros_context, parameter_overrides=[
        Parameter('mesh_path', value=str(tmp_path / 'femur.stl')),
        Parameter('cache_dir', value=str(tmp_path)), Parameter('autostart', value=False)])
    yield node
    node.destroy_node()


def _reconfigure_while_the_first_worker_hangs(node, fake, monkeypatch) -> list[str]:
    """Configure, clean up (the join times out), configure and activate again; return the
    JSON of every model message published after the second configure."""
    monkeypatch.setattr(BoneRegistrar, 'from_mesh', staticmethod(fake))
    assert neural_bone_reg.BoneRegistrar is BoneRegistrar  # what the worker imports
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS  # join times out
    assert fake.threads and fake.threads[0].is_alive(), 'the first worker should still run'
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    published: list[str] = []
    monkeypatch.setattr(node._model_pub, 'publish', lambda msg: published.append(msg.data))
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    assert node.ready.wait(WAIT_S), node.failure
    fake.release.set()
    fake.threads[0].join(WAIT_S)
    assert not fake.threads[0].is_alive()
    return published


def test_stale_worker_does_not_publish_its_old_model(loader, tmp_path, monkeypatch):
    fake = _SlowThenFast(tmp_path)

    published = _reconfigure_while_the_first_worker_hangs(loader, fake, monkeypatch)

    assert [decode_model_info(data).sha256 for data in published] == ['b' * 64]
    assert loader.model_info.sha256 == 'b' * 64
    assert decode_model_info(loader._model_msg.data).sha256 == 'b' * 64
    assert loader.ready.is_set() and loader.failure is None
    level, message, _ = loader._model_status
    assert 'ready' in message and level != ERROR


def test_stale_worker_failure_is_not_reported(loader, tmp_path, monkeypatch):
    fake = _SlowThenFast(tmp_path, first_fails=True)

    _reconfigure_while_the_first_worker_hangs(loader, fake, monkeypatch)

    assert loader.failure is None
    assert loader._model_status[0] != ERROR
    assert loader.model_info.sha256 == 'b' * 64


def test_cleanup_after_the_model_is_ready_forgets_it(loader, tmp_path, monkeypatch):
    fake = _SlowThenFast(tmp_path)
    fake.threads.append(threading.current_thread())  # no slow first call: model 'b' at once
    monkeypatch.setattr(BoneRegistrar, 'from_mesh', staticmethod(fake))
    assert loader.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert loader.ready.wait(WAIT_S), loader.failure
    assert loader.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert loader.model_info is None and not loader.ready.is_set()


def test_a_worker_abandoned_by_destroy_node_publishes_nothing_and_fails_quietly(
        ros_context, tmp_path, monkeypatch):
    """destroy_node's join times out while the model loads; when the load ends, the stale
    worker publishes no model, no surface and no status, and raises nothing."""
    monkeypatch.setattr(preop_loader, 'WORKER_JOIN_TIMEOUT_S', JOIN_TIMEOUT_S)
    errors: list[Any] = []
    monkeypatch.setattr(threading, 'excepthook', errors.append)
    fake = _SlowThenFast(tmp_path)
    loading = threading.Event()

    def from_mesh(mesh_path: str, **kwargs: Any) -> _FakeRegistrar:
        loading.set()
        return fake(mesh_path, **kwargs)
    monkeypatch.setattr(BoneRegistrar, 'from_mesh', staticmethod(from_mesh))
    node = preop_loader.PreopLoader(context=ros_context, parameter_overrides=[
        Parameter('mesh_path', value=str(tmp_path / 'femur.stl')),
        Parameter('cache_dir', value=str(tmp_path)), Parameter('autostart', value=False)])
    published: list[Any] = []
    for pub in ('_diag_pub',):
        monkeypatch.setattr(getattr(node, pub), 'publish', published.append)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    for pub in ('_model_pub', '_surface_pub'):
        monkeypatch.setattr(getattr(node, pub), 'publish', published.append)
    assert loading.wait(WAIT_S), 'the worker never started loading'
    node.destroy_node()  # the join times out: the worker is abandoned
    assert fake.threads[0].is_alive()
    published.clear()
    fake.release.set()
    fake.threads[0].join(WAIT_S)
    assert not fake.threads[0].is_alive()
    assert published == [] and not node.ready.is_set() and node.model_info is None
    assert errors == []

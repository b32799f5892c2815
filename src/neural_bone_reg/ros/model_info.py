"""The JSON document on the latched ``model`` topic (std_msgs/String), shared by both nodes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
import json

#: Version of this JSON layout; a reader refuses any other.
MODEL_INFO_FORMAT_VERSION = 1
#: The only length unit the registrar works in.
MODEL_UNITS = 'mm'


@dataclass(frozen=True)
class ModelInfo:
    """Where the trained bone model is, and what it describes."""

    checkpoint: str
    """Absolute path of the UDF checkpoint on the shared file system."""
    sha256: str
    """sha256 of the source mesh file; the loaded checkpoint must match it."""
    bone_frame: str
    """tf frame of the mesh (the frame the registration broadcasts as child)."""
    units: str = MODEL_UNITS
    """Length unit of the mesh and checkpoint."""
    format_version: int = MODEL_INFO_FORMAT_VERSION
    """Version of this JSON layout."""


#: A model message longer than this (characters) is refused unread: a ModelInfo is < 1 KiB.
MAX_MODEL_MESSAGE_CHARS = 65536


def encode_model_info(info: ModelInfo) -> str:
    """Return the model info as a JSON string."""
    return json.dumps(asdict(info), sort_keys=True)


def decode_model_info(text: str) -> ModelInfo:
    """Parse and check a model JSON string; raise ValueError saying what is wrong."""
    if len(text) > MAX_MODEL_MESSAGE_CHARS:
        raise ValueError(f'model message has {len(text)} characters; expected a ModelInfo '
                         f'JSON object of at most {MAX_MODEL_MESSAGE_CHARS}')
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        reason = exc if isinstance(exc, json.JSONDecodeError) else 'nested too deep'
        raise ValueError(f'model message is not JSON ({reason}); expected a ModelInfo '
                         'object') from exc
    if not isinstance(data, dict):
        raise ValueError(f'model message holds {type(data).__name__}; expected a JSON object')
    missing = sorted({'checkpoint', 'sha256', 'bone_frame', 'units', 'format_version'} - set(data))
    if missing:
        raise ValueError(f'model message lacks {missing}')
    if data['format_version'] != MODEL_INFO_FORMAT_VERSION:
        raise ValueError(f'model message format_version {data["format_version"]!r}; this node '
                         f'reads version {MODEL_INFO_FORMAT_VERSION}')
    if data['units'] != MODEL_UNITS:
        raise ValueError(f'model units {data["units"]!r}; expected {MODEL_UNITS!r}')
    for key in ('checkpoint', 'sha256', 'bone_frame'):
        if not isinstance(data[key], str) or not data[key]:
            raise ValueError(f'model message field {key!r} must be a non-empty string')
    return ModelInfo(checkpoint=data['checkpoint'], sha256=data['sha256'],
                     bone_frame=data['bone_frame'], units=data['units'],
                     format_version=data['format_version'])

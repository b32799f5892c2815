"""neural_bone_reg: per-patient neural UDF and multi-hypothesis rigid registration of bones.

``BoneRegistrar`` and ``RegistrationResult`` are imported lazily, so that light users of the
package (message conversions, bag replay, ``--help``) do not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ['BoneRegistrar', 'RegistrationResult']


def __getattr__(name: str) -> Any:
    if name in __all__:
        from neural_bone_reg.core import registrar
        return getattr(registrar, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

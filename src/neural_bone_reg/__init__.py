"""neural_bone_reg: per-patient neural UDF and multi-hypothesis rigid registration of bones."""

from neural_bone_reg.core.registrar import BoneRegistrar, RegistrationResult

__all__ = ['BoneRegistrar', 'RegistrationResult']

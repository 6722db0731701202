"""Fake ``habana_frameworks.torch.hpex`` (fused kernels), implemented with plain torch."""

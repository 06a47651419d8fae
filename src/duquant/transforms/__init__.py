"""Invertible input transforms: smoothing, block rotations, permutations, Hadamard."""

from duquant.transforms.base import BlockRotation, ChannelScale, Permutation, Sequence, Transform

__all__ = ["BlockRotation", "ChannelScale", "Permutation", "Sequence", "Transform"]

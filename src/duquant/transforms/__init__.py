"""Invertible input transforms: smoothing, block rotations, permutations, Hadamard, Kronecker."""

from duquant.transforms.base import BlockRotation, ChannelScale, Permutation, Sequence, Transform
from duquant.transforms.kronecker import Kronecker

__all__ = ["BlockRotation", "ChannelScale", "Kronecker", "Permutation", "Sequence", "Transform"]

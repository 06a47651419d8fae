"""Optional fused kernels (Triton), each tested bit for bit against the torch codec."""

from duquant.kernels.triton_mx import rotate_quantize_mxfp4, supports, triton_available

__all__ = ["rotate_quantize_mxfp4", "supports", "triton_available"]

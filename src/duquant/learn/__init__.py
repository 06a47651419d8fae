"""Learned input transforms, trained block by block on the quantized block's output error."""

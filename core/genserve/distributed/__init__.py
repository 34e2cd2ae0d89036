"""Tensor-parallel state shared by the layers."""

"""Merge methods for shared layers and MoE builders."""

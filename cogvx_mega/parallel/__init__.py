"""Parallelism: process groups, the CPU compatibility layer for megatron-core, data-parallel helpers."""

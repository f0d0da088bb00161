"""The CogVideoX expert transformer on megatron-core."""

"""GPUs: NVML inventory, instance → GPU mapping, and per-GPU P-state policy and control."""

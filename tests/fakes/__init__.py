"""Recording fakes for the hardware boundary (NVML, NVAPI); used by tests only."""

"""Peak dense matmul throughput of the accelerator, the denominator of MFU.

MFU is only meaningful against a known peak, so unknown devices (and CPUs)
report none rather than a guess. The device name comes from the runtime
(`Runtime.device_name`).
"""

# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, FLOP/s.
_PEAKS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362e12, "float32": 91.6e12},
}


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device named `device_name` for `dtype`, or None when unknown (CPUs included)."""
    name = device_name
    for model, peaks in _PEAKS.items():
        if model in name:
            return peaks.get(dtype)
    return None

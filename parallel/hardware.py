"""Peak dense matmul throughput of the accelerator, the denominator of MFU.

MFU is only meaningful against a known peak, so unknown devices (and CPUs)
report none rather than a guess. Keys are the exact names CUDA reports
(`torch.cuda.get_device_name`, `Runtime.device_name`): the SXM and PCIe
parts of one chip differ by a third in clocks and power, so a prefix match
would overstate or understate MFU.
"""

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s: (bfloat16, float32 via TF32 off).
_PEAKS = {
    "NVIDIA H100 80GB HBM3": (989e12, 67e12),  # H100 SXM5
    "NVIDIA H100 PCIe": (756e12, 51e12),
    "NVIDIA H100 NVL": (835e12, 60e12),
    "NVIDIA H200": (989e12, 67e12),  # H200 SXM: the H100 SXM's compute, more memory
    "NVIDIA H200 NVL": (835e12, 60e12),
    "NVIDIA GH200 480GB": (989e12, 67e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 19.5e12),
    "NVIDIA A100 80GB PCIe": (312e12, 19.5e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 19.5e12),
    "NVIDIA L40S": (362e12, 91.6e12),
}
_DTYPES = {"bfloat16": 0, "float32": 1}


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device named exactly `device_name` for `dtype`; None when unknown (CPUs included)."""
    peaks = _PEAKS.get(device_name.strip())
    if peaks is None or dtype not in _DTYPES:
        return None
    return peaks[_DTYPES[dtype]]

"""Which precision `--dtype auto` (the default) runs, from what the device offers.

The fastest precision that holds the parity bar (every vector within cosine 0.9999 of float32):
- a CPU with bfloat16 units (AMX-BF16 or AVX512-BF16): bfloat16-mixed, matrix products in bfloat16
  with float32 weights, residual stream, norms and softmax (1.6x to 2x float32 in-process here,
  benchmarks/RESULTS.md); any other CPU: float32, which it runs fastest;
- a GPU that computes in bfloat16 (Ampere and later): bfloat16-mixed; an older one: float32.
A pinned `--dtype` runs as given. The manifest records what ran and why.

Torch is imported only for a GPU: the driver asks without loading it for a CPU pool.
"""

from __future__ import annotations

from semvec.config import DType

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of the units bfloat16-mixed needs


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve(requested: DType | str, device: str) -> tuple[DType, str]:
    """(the precision to run, why) for `requested` on a device of type `device` (cpu, cuda, ...)."""
    requested = DType(requested)
    if requested != DType.AUTO:
        return requested, "pinned (--dtype)"
    if device == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return DType.BFLOAT16_MIXED, "auto: the GPU computes in bfloat16"
        return DType.FLOAT32, "auto: the GPU does not compute in bfloat16"
    if device == "cpu":
        have = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
        if have:
            return DType.BFLOAT16_MIXED, f"auto: the CPU has bfloat16 units ({', '.join(have)})"
        return DType.FLOAT32, f"auto: the CPU has no bfloat16 units ({' or '.join(BF16_CPU_FLAGS)})"
    return DType.FLOAT32, f"auto: float32 on a {device} device"


def resolve_on_worker(requested: DType | str, cpus: float, gpus: float) -> tuple[str, str]:
    """resolve() on a node where an encoder actor of these resources would run (a Ray task with
    them), as (value, why): the driver may run on a node of another kind."""
    if DType(requested) != DType.AUTO:
        return resolved(DType(requested).value, "pinned")
    import ray

    task = ray.remote(num_cpus=cpus, num_gpus=gpus or None)(resolved)
    return ray.get(task.remote(DType(requested).value, "cuda" if gpus else "cpu"))


def resolved(requested: DType | str, device: str) -> tuple[str, str]:
    """resolve() as (value, why), as a manifest records it; run where the encoding runs."""
    dtype, why = resolve(requested, device)
    return dtype.value, why

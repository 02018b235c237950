"""Pack what `benchmarks/gpu.py` needs on a lent GPU machine that cannot fetch anything.

    .venv/bin/python benchmarks/device_kit.py [--out .devkit] [--part-mb 62] [--python 3.12]

The lent machine (`device` in the tool library) has Python 3.12, PyTorch with CUDA, transformers,
sentence-transformers, pyarrow and pandas, but no Ray, no network and no copy of the bundled
model or the datasets; each call carries at most 64 MiB beside the working tree. So this packs one
archive of: the wheels of Ray and of its dependencies that machine lacks (jsonschema and its
own), built for --python; the bundled model's directory; and the two dataset files the mixed
corpus is drawn from (STS-B, SciFact's corpus). The archive is cut into parts of at most --part-mb
MB, one folder each (OUT/1, OUT/2, ...), each with kit.json (the archive's sha256 and parts).

On the device, one call per part, back to back: a machine stays warm only about 30 s after a call
and a fresh one starts bare, so each call must follow the last at once (each prints "kit ...: N of
3 parts here"; if a later one says fewer than it should, the machine was replaced: start over):

    run(carry=[".devkit/1"], command="bash benchmarks/device_gpu.sh")
    run(carry=[".devkit/2"], command="bash benchmarks/device_gpu.sh")
    run(carry=[".devkit/3"], timeout_s=540,
        command="bash benchmarks/device_gpu.sh --rows 200000 --st-batch-sizes 128,256,512")

benchmarks/device_gpu.sh stores each part outside the checkout and, once all are there, checks the
archive, installs the wheels into a folder of their own and runs gpu.py on the model and datasets
it holds, writing the log to $OUT. `.devkit/` is ignored by git.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Ray and what Ray needs that the lent machines' image lacks (KINDS.md's package list); the rest of
# semvec's embed path (torch, transformers, pyarrow, pandas, numpy, yaml, psutil, peft) is there.
WHEELS = ("ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download_wheels(folder: Path, python: str) -> list[Path]:
    """The WHEELS at the versions installed here, for CPython `python` on x86-64 Linux."""
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *platforms, "-d", str(folder),
                    *pins], check=True)
    return sorted(folder.glob("*.whl"))


def build(out: Path, part_bytes: int, python: str, model: Path | None = None, wheels: bool = True) -> dict:
    """Write the kit's parts and return its description; `model` defaults to the bundled one, and
    `wheels=False` leaves the wheels out (the test's small kit)."""
    from benchmarks.throughput import DATASETS
    from semvec.models import resolve_model

    model = model or resolve_model("bundled")
    datasets = [DATASETS / "stsb" / f"sts-{s}.csv" for s in ("train", "dev", "test")]
    datasets.append(DATASETS / "beir_scifact" / "corpus.jsonl")
    missing = [str(p) for p in datasets if not p.exists()]
    if missing:
        sys.exit(f"device_kit: dataset files not found: {', '.join(missing)} (set SEMVEC_DATASETS)")
    if out.exists() and any(out.iterdir()) and not (out / "1" / "kit.json").exists():
        sys.exit(f"device_kit: {out} holds something that is not a kit; choose another --out")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_files = download_wheels(Path(tmp) / "wheels", python) if wheels else []
        archive = Path(tmp) / "kit.tar"
        with tarfile.open(archive, "w") as tar:
            for wheel in wheel_files:
                tar.add(wheel, f"wheels/{wheel.name}")
            tar.add(model, "model")
            for path in datasets:
                tar.add(path, f"datasets/{path.relative_to(DATASETS)}")
        digest, parts, size = hashlib.sha256(), 0, archive.stat().st_size
        with open(archive, "rb") as f:
            while chunk := f.read(part_bytes):
                parts += 1
                digest.update(chunk)
                (out / str(parts)).mkdir()
                (out / str(parts) / f"kit.tar.{parts:02d}").write_bytes(chunk)
    kit = {"sha256": digest.hexdigest(), "parts": parts, "bytes": size,
           "wheels": [w.name for w in wheel_files], "python": python}
    for part in range(1, parts + 1):  # each call's part says what the whole is
        (out / str(part) / "kit.json").write_text(json.dumps(kit, indent=1))
    return kit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / ".devkit")
    ap.add_argument("--part-mb", type=int, default=62,
                    help="each call carries 64 MiB (67.1 MB) with the checkout")
    ap.add_argument("--python", default="3.12", help="the lent machine's Python (KINDS.md)")
    args = ap.parse_args()
    kit = build(args.out, args.part_mb * 1_000_000, args.python)
    print(json.dumps(kit, indent=1))
    for part in range(1, kit["parts"] + 1):
        print(f'call {part}: carry=[".devkit/{part}"] command="bash benchmarks/device_gpu.sh"')


if __name__ == "__main__":
    main()

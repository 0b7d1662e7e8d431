"""The wheel folder that bench/gpu_check.sh installs on a bare GPU machine (no network, its own Python 3.12 and torch).

Such a machine lacks diffusers, DVC, dvclive, bitsandbytes, open_clip and their dependencies (bench/
gpu_machine_packages.txt lists what it has). This script downloads, for CPython 3.12 on manylinux x86_64, exactly the
wheels pinned in bench/gpu_wheels.txt (the closure of our requirements less what the machine has; the top-level pins
are requirements.txt's), builds the pure-python ones PyPI has only as sources, and repacks bitsandbytes with only its
CUDA 13 and CPU libraries (the machine's torch is cu130; the full wheel holds ten CUDA and ROCm builds, 43 MB). It then
installs the folder into a temporary target as the GPU machine does, imports bitsandbytes from there, and writes
bench/gpu_wheels.json: each wheel's size, `Requires-Dist` and top-level modules, which tests/test_gpu_wheels.py checks
against requirements.txt and the machine's list without a network.

Run (needs PyPI): `make gpu-wheels`, i.e. python scripts/gpu_wheels.py gpu-wheels
`--lock` rewrites bench/gpu_wheels.txt from this environment (after requirements.txt changed and `make setup` ran).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from base64 import urlsafe_b64encode
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "bench" / "gpu_wheels.txt"
MANIFEST = REPO / "bench" / "gpu_wheels.json"
MACHINE = REPO / "bench" / "gpu_machine_packages.txt"
MAX_BYTES = 60 * 2**20  # the repository and its carried folders travel to the machine within 64 MiB
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
                                "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                "manylinux1_x86_64", "linux_x86_64", "any")]
# Requirements the GPU check does not carry, with the reason (every other one is carried or on the machine)
NOT_CARRIED = {"datasets": "imported by no stage, bench or script (the study's data comes through fetch's own code)"}
# Pure-python packages that PyPI has as sources only at the pinned version: built into a py3-none-any wheel here
SOURCES_ONLY = {"antlr4-python3-runtime": "hydra-core and omegaconf need 4.9.*, which has no wheel on PyPI"}
BITSANDBYTES_KEEP = re.compile(r"bitsandbytes/libbitsandbytes_(cpu|cuda13\d)\.so$")
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "extra": ""}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of a file of `name==version` lines (comments and blank lines skipped)."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {normalized(name): version for name, version in (line.split("==") for line in lines if line)}


def machine_packages(path: Path = MACHINE) -> dict[str, str | None]:
    """{normalized name: version, or None where the machine's list gives none}."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {normalized(line.split("==")[0]): (line.split("==")[1] if "==" in line else None) for line in lines if line}


def lock() -> dict[str, str]:
    """The installed closure of requirements.txt's packages, less what the machine has and what is not carried."""
    from packaging.requirements import Requirement

    machine, installed = machine_packages(), {normalized(d.metadata["Name"]): d for d in metadata.distributions()}
    stack = [n for n in read_pins(REPO / "requirements.txt") if n not in NOT_CARRIED]
    pins: dict[str, str] = {}
    while stack:
        name = normalized(stack.pop())
        if name in pins or name in machine:
            continue
        pins[name] = installed[name].version
        required = (Requirement(r) for r in installed[name].requires or [])
        stack += [r.name for r in required if not r.marker or r.marker.evaluate(MARKERS)]
    return dict(sorted(pins.items()))


def unmet(wheels: list[dict], available: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """(unmet, unverified): each wheel's `Requires-Dist` for CPython 3.12 on Linux (extras left out) against the
    carried wheels plus `available` ({name: version, None where unknown}); unverified: present, version unknown."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    have = available | {w["name"]: w["version"] for w in wheels}
    missing, unknown = [], []
    for wheel in wheels:
        for requirement in map(Requirement, wheel["requires_dist"]):
            if requirement.marker and not requirement.marker.evaluate(MARKERS):
                continue
            name, said = normalized(requirement.name), f"{wheel['name']} needs {requirement}"
            if name not in have:
                missing.append(f"{said}: not carried, not on the machine")
            elif have[name] is None:
                unknown.append(said) if requirement.specifier else None
            elif not requirement.specifier.contains(Version(have[name]), prereleases=True):
                missing.append(f"{said}: {have[name]} there")
    return missing, unknown


def uncovered(requirements: dict[str, str], wheels: list[dict], machine: dict[str, str | None]) -> list[str]:
    """requirements.txt's pins that are neither carried at that version, nor on the machine, nor NOT_CARRIED."""
    carried = {w["name"]: w["version"] for w in wheels}
    return [f"{name}=={version}" + (f" (carried: {carried[name]})" if name in carried else "")
            for name, version in requirements.items()
            if carried.get(name) != version and name not in machine and name not in NOT_CARRIED]


def compatible(folder: Path) -> None:
    """Print the folder's wheels this Python can install, one a line; name the others on stderr. On the GPU machine
    (CPython 3.12) that is all of them; the dry run's --system-python on another Python leaves the binary ones out."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    wheels = sorted(folder.glob("*.whl"))
    fits = {wheel: bool(parse_wheel_filename(wheel.name)[3] & supported) for wheel in wheels}
    print("\n".join(str(wheel) for wheel, fit in fits.items() if fit))
    if left := [wheel.name for wheel, fit in fits.items() if not fit]:
        print(f"not for this Python, left out: {' '.join(left)}", file=sys.stderr)


def check_installed() -> None:
    """On the GPU machine, after installing the folder: every carried wheel's needs met by what this Python sees."""
    wheels = json.loads(MANIFEST.read_text())["wheels"]
    installed = {normalized(d.metadata["Name"]): d.version for d in metadata.distributions()}
    absent = [w["name"] for w in wheels if w["name"] not in installed]
    missing, _ = unmet(wheels, installed)
    if absent or missing:
        sys.exit(f"error: {'; '.join([f'{n} not installed' for n in absent] + missing)}")


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"], check=True)


def download(pins: dict[str, str], folder: Path) -> None:
    """The pinned wheels not in `folder` yet: binary ones for the target from PyPI, the sources-only ones built here."""
    present = {normalized(wheel.name.split("-")[0]) for wheel in folder.glob("*.whl")}
    missing = {name: version for name, version in pins.items() if name not in present}
    binary = [f"{n}=={v}" for n, v in missing.items() if n not in SOURCES_ONLY]
    if binary:
        pip("download", "--no-deps", *TARGET, "--dest", str(folder), *binary)
    for name in SOURCES_ONLY.keys() & missing.keys():
        pip("wheel", "--no-deps", "--wheel-dir", str(folder), f"{name}=={missing[name]}")
        if not list(folder.glob(f"{name.replace('-', '_')}-{missing[name]}-py3-none-any.whl")):
            sys.exit(f"error: {name} {missing[name]} did not build as a pure-python wheel: it cannot be carried")


def record_line(name: str, data: bytes) -> str:
    digest = urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack_bitsandbytes(wheel: Path) -> list[str]:
    """Drop every native library but the CPU and CUDA 13 ones; RECORD rewritten to match. Returns what was dropped."""
    with zipfile.ZipFile(wheel) as source:
        infos = source.infolist()
        dropped = [i.filename for i in infos if i.filename.endswith(".so") and not BITSANDBYTES_KEEP.search(i.filename)]
        if not dropped:
            return []
        kept = {i.filename: source.read(i) for i in infos if i.filename not in dropped}
    record = next(name for name in kept if name.endswith(".dist-info/RECORD"))
    lines = [line for line in kept[record].decode().splitlines() if line.split(",")[0] not in dropped]
    kept[record] = ("\n".join(lines) + "\n").encode()
    repacked = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(repacked, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in kept.items():
            target.writestr(name, data)
    repacked.replace(wheel)
    return dropped


def native_libraries(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return sorted(Path(name).name for name in archive.namelist() if name.endswith(".so"))


def wheel_entry(wheel: Path) -> dict:
    """What the manifest keeps of one wheel."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    headers = HeaderParser().parsestr(meta)
    top = sorted({n.split("/")[0].removesuffix(".py") for n in names
                  if not n.split("/")[0].endswith((".dist-info", ".data")) and (n.endswith(".py") or "/" in n)})
    return {"file": wheel.name, "name": normalized(headers["Name"]), "version": headers["Version"],
            "bytes": wheel.stat().st_size, "requires_dist": headers.get_all("Requires-Dist") or [],
            "top_level": top}


def verify(folder: Path) -> None:
    """Install the folder as the GPU machine does (for CPython 3.12) into a temporary target; import bitsandbytes."""
    with tempfile.TemporaryDirectory() as target:
        pip("install", "--no-index", "--no-deps", "--no-compile", *TARGET, "--target", target,
            *map(str, sorted(folder.glob("*.whl"))))
        code = "import bitsandbytes, sys; print('bitsandbytes', bitsandbytes.__version__, 'imports from', " \
               "bitsandbytes.__file__)"
        subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": target, "PATH": "/usr/bin:/bin"})


def build(folder: Path) -> dict:
    pins = read_pins(PINS)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.whl"):
        if normalized(stale.name.split("-")[0]) not in pins or stale.name.split("-")[1] != pins[
                normalized(stale.name.split("-")[0])]:
            stale.unlink()
    download(pins, folder)
    dropped = repack_bitsandbytes(next(folder.glob("bitsandbytes-*.whl")))
    entries = [wheel_entry(w) for w in sorted(folder.glob("*.whl"))]
    found = {e["name"]: e["version"] for e in entries}
    if found != pins:
        sys.exit(f"error: {folder} holds {sorted(set(found.items()) ^ set(pins.items()))} beside the pins of {PINS}")
    total = sum(e["bytes"] for e in entries)
    if total > MAX_BYTES:
        sys.exit(f"error: the wheels take {total / 2**20:.1f} MiB, over {MAX_BYTES / 2**20:.0f} MiB")
    verify(folder)
    return {"date": datetime.date.today().isoformat(), "target": "CPython 3.12, manylinux x86_64",
            "total_bytes": total, "bitsandbytes_dropped": sorted(Path(d).name for d in dropped),
            "bitsandbytes_kept": native_libraries(next(folder.glob("bitsandbytes-*.whl"))), "wheels": entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=REPO / "gpu-wheels")
    parser.add_argument("--lock", action="store_true", help=f"rewrite {PINS.name} from this environment")
    parser.add_argument("--check-installed", action="store_true", help="the carried wheels' needs met here?")
    parser.add_argument("--compatible", action="store_true", help="list FOLDER's wheels this Python can install")
    args = parser.parse_args()
    if args.check_installed:
        return check_installed()
    if args.compatible:
        return compatible(args.folder)
    if args.lock:
        header = [line for line in PINS.read_text().splitlines() if line.startswith("#")]
        PINS.write_text("\n".join(header + [f"{n}=={v}" for n, v in lock().items()]) + "\n")
        return print(f"wrote {PINS}")
    manifest = build(args.folder)
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(manifest['wheels'])} wheels, {manifest['total_bytes'] / 2**20:.1f} MiB in {args.folder}; "
          f"wrote {MANIFEST}")


if __name__ == "__main__":
    main()

"""The wheel folder a bare GPU machine installs (scripts/gpu_wheels.py, `make gpu-wheels`), checked without a network
through its committed manifest (bench/gpu_wheels.json, each wheel's METADATA `Requires-Dist` and top-level modules):
every requirement is carried, on the machine (bench/gpu_machine_packages.txt) or named as not needed; every carried
wheel's needs are met by the carried set plus the machine; every third-party import of the stages, the package and the
benches comes from one of the two. Seen failing: `einops==0.8.1` added to requirements.txt, and bitsandbytes' needs
with `packaging` struck from the machine's list (the last two tests do both on copies)."""
from __future__ import annotations

import ast
import json
import sys
from importlib import metadata

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_wheels  # noqa: E402

MANIFEST = json.loads(gpu_wheels.MANIFEST.read_text())
MACHINE = gpu_wheels.machine_packages()
REQUIREMENTS = gpu_wheels.read_pins(REPO / "requirements.txt")
OURS = {"stylestudy", "stages", "scripts"} | {path.stem for path in [*REPO.glob("bench/*.py"), *REPO.glob("scripts/*.py")]}


def test_the_manifest_is_the_pinned_set_within_the_size_with_only_cuda13_and_cpu_bitsandbytes() -> None:
    carried = {w["name"]: w["version"] for w in MANIFEST["wheels"]}
    assert carried == gpu_wheels.read_pins(gpu_wheels.PINS)
    assert sum(w["bytes"] for w in MANIFEST["wheels"]) == MANIFEST["total_bytes"] <= gpu_wheels.MAX_BYTES
    assert MANIFEST["bitsandbytes_kept"] == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so",
                                             "libbitsandbytes_cuda132.so"]
    assert not carried.keys() & MACHINE.keys(), "a carried wheel would shadow the machine's own package"


def test_every_requirement_is_carried_at_its_pin_or_on_the_machine_or_named_not_carried() -> None:
    assert gpu_wheels.uncovered(REQUIREMENTS, MANIFEST["wheels"], MACHINE) == []
    added = REQUIREMENTS | {"einops-new-dependency": "0.8.1"}
    assert gpu_wheels.uncovered(added, MANIFEST["wheels"], MACHINE) == ["einops-new-dependency==0.8.1"]


def test_every_carried_wheels_needs_are_met_by_the_carried_set_and_the_machine() -> None:
    missing, _ = gpu_wheels.unmet(MANIFEST["wheels"], MACHINE)
    assert missing == []
    without = {name: version for name, version in MACHINE.items() if name != "packaging"}
    missing, _ = gpu_wheels.unmet(MANIFEST["wheels"], without)
    assert "bitsandbytes needs packaging>=20.9: not carried, not on the machine" in missing


def third_party_imports() -> set[str]:
    """Top-level names imported anywhere in stages/, stylestudy/, bench/ and scripts/, less the standard library."""
    names = set()
    for path in [*REPO.glob("stages/*.py"), *REPO.glob("stylestudy/**/*.py"), *REPO.glob("bench/*.py"),
                 *REPO.glob("scripts/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - OURS


def test_every_import_comes_from_a_carried_wheel_or_the_machine() -> None:
    distributions = metadata.packages_distributions()
    carried = {module for wheel in MANIFEST["wheels"] for module in wheel["top_level"]}
    imports = third_party_imports()
    assert {"diffusers", "dvc", "dvclive", "open_clip", "bitsandbytes", "torch", "omegaconf"} <= imports
    uncovered = [name for name in imports if name not in carried and not any(
        gpu_wheels.normalized(dist) in MACHINE for dist in distributions.get(name, []))]
    assert uncovered == []

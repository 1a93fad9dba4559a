"""Dependency floors: one list, the same in the package metadata, and a clear error on an older release."""

import importlib.metadata
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from hf_sparse_ift.models.sparse_wide_gpt.compat import MINIMUM_VERSIONS, check_versions


def test_package_metadata_states_the_same_floors():
    lower_bounds = {}
    for line in importlib.metadata.requires("hf-sparse-ift"):
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=" and requirement.marker is None:  # extras carry a marker
                lower_bounds[requirement.name] = spec.version
    assert {name: lower_bounds[name] for name in MINIMUM_VERSIONS} == MINIMUM_VERSIONS


def test_an_old_release_is_named_with_the_installed_and_required_versions():
    installed = importlib.metadata.version("transformers")
    with pytest.raises(ImportError) as err:
        check_versions(["transformers", "torch"], {"transformers": "99.0", "torch": "2.0"})
    assert str(err.value) == (
        f"Sparse Wide GPT (hf-sparse-ift) needs 'transformers>=99.0' but found transformers {installed}: "
        "run pip install --upgrade 'transformers>=99.0'"
    )


def fake_distribution(folder, name, version):
    """A dist-info that importlib.metadata finds before the real one when `folder` leads sys.path."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_importing_the_package_with_an_older_transformers_fails_with_one_sentence(tmp_path):
    fake_distribution(tmp_path, "transformers", "5.23.0")
    result = subprocess.run(
        [sys.executable, "-c", "import hf_sparse_ift"],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    floor = MINIMUM_VERSIONS["transformers"]
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"ImportError: Sparse Wide GPT (hf-sparse-ift) needs 'transformers>={floor}' but found transformers 5.23.0: "
        f"run pip install --upgrade 'transformers>={floor}'"
    )

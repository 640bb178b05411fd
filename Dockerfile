# GPU image for clusters, in two Python environments:
#   - the trainer: NGC PyTorch (CUDA 13, NCCL, Transformer-Engine and Apex inside) + pinned
#     megatron-core + this package, with the upstream patches applied;
#   - /opt/sglang: the SGLang rollout server and sglang-router, with sglang's own torch and CUDA
#     kernels. examples/moe/launch_sglang_rollout.sh runs them (SGLANG_PYTHON below), and so does
#     the trainer's rollout.sglang.launch (ROLLOUT_URLS=launch passes SGLANG_PYTHON as launch.python).
#
# Never built or run: this repository's machines have no Docker engine and no GPU. What is checked
# without docker (tests/e2e/test_dockerfile.py): the pins here agree with pyproject.toml (its
# dependencies, and its `sglang-server` dependency group for the /opt/sglang environment).
#
# Why SGLang has its own environment. An sglang release pins an exact PyPI torch and CUDA kernels
# built against it: sglang 0.5.23 (Requires-Dist, read from its wheel) pins torch==2.14.1,
# transformers==5.19.0, tokenizers==0.23.2, sglang-kernel==0.4.10, flashinfer_python[cu13]==0.7.2,
# flash-attn-4, sgl-deep-ep / sgl-deep-gemm and cuda-python>=13. NGC's torch is its own build
# (2.x.0a0+...), which satisfies no such pin: installing sglang with its dependencies would replace
# it (and break the TE / Apex built against it), and installing it with --no-deps (what this file
# did before) leaves sglang without its kernels. The trainer talks to SGLang over HTTP only and
# never imports it, so no process needs both. The releases that pin pyproject.toml's torch==2.13.0
# (0.5.19-0.5.21) cannot be installed with their dependencies any more: they, and 0.5.22, pin
# cuda-tile==1.6.0rc5, which the package index no longer serves (pip 26.3, Python 3.12, December
# 2026; 0.5.23 and sglang-router 0.3.2 resolve completely for Python 3.12 on x86_64).
# The CPU tests run sglang 0.5.21 (tools/sglang_cpu, which installs it --no-deps with a CPU torch);
# the HTTP contract the trainer uses was read from the 0.5.21-0.5.23 wheels (docs/sglang.md).
# Both halves need a CUDA 13 driver (>= 580): sglang 0.5.23's torch and kernels are cu13 wheels, and
# NGC 25.09 is a CUDA 13.0 image (NVIDIA's release notes; not checked here).
FROM nvcr.io/nvidia/pytorch:25.09-py3

ARG SGLANG_VERSION=0.5.23
ARG SGLANG_ROUTER_VERSION=0.3.2

ENV PIP_NO_CACHE_DIR=1 \
    NCCL_CUMEM_ENABLE=0 \
    NCCL_NVLS_ENABLE=0 \
    TOKENIZERS_PARALLELISM=false \
    SGLANG_PYTHON=/opt/sglang/bin/python

# 1. SGLang first (it changes least often, so its large layer stays cached): a virtualenv of its
# own, with every dependency at sglang's pins. NGC images (25.03+) constrain pip to their own
# package versions (/etc/pip/constraint.txt, through pip's configuration or PIP_CONSTRAINT), torch
# included; that must not apply here, so this pip reads no configuration and no PIP_CONSTRAINT.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/sglang \
 && env -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
        /opt/sglang/bin/python -m pip install --upgrade "pip>=25.1" \
 && env -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
        /opt/sglang/bin/python -m pip install "sglang==${SGLANG_VERSION}" "sglang-router==${SGLANG_ROUTER_VERSION}" \
 && /opt/sglang/bin/python -m pip check \
 && /opt/sglang/bin/python -c "import importlib.metadata as m; \
v = {p: m.version(p) for p in ('sglang', 'sglang-router', 'sglang-kernel', 'flashinfer-python', 'torch')}; \
print(v); assert (v['sglang'], v['sglang-router']) == ('${SGLANG_VERSION}', '${SGLANG_ROUTER_VERSION}'), v"

# 2. The trainer, on NGC's torch / TE / Apex: --no-deps for the pinned GPU package and this one,
# then this package's pure-Python dependencies at pyproject.toml's versions (torch excepted: NGC's).
WORKDIR /opt/gmpo-megatron
COPY pyproject.toml constraints.txt README.md ./
COPY gmpo_megatron ./gmpo_megatron
COPY patches ./patches
COPY examples ./examples
COPY tools ./tools
RUN pip install --no-deps megatron-core==0.16.1 \
 && pip install --no-deps -e . \
 && pip install "psutil>=5.9" "transformers>=5.0,<6" "datasets>=3.0" "safetensors>=0.4" \
        "tokenizers>=0.20" "math-verify>=0.7" "pydantic>=2.5,<3" "pyyaml>=6" "tqdm>=4.60" \
        "tensorboard>=2.14" "matplotlib>=3.7" "numpy>=2.0" "aiohttp>=3.9" \
 && python patches/apply.py --apply

ENTRYPOINT ["gmpo-train"]

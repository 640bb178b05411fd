# GPU image for clusters: NGC PyTorch (CUDA, NCCL, Transformer-Engine and Apex inside) + pinned
# megatron-core and SGLang + this package, with the upstream patches applied.
# Not built in CI (no Docker engine, no GPU there); keep the pins in step with pyproject.toml.
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PIP_NO_CACHE_DIR=1 \
    NCCL_CUMEM_ENABLE=0 \
    NCCL_NVLS_ENABLE=0 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/gmpo-megatron
COPY pyproject.toml constraints.txt README.md ./
COPY gmpo_megatron ./gmpo_megatron
COPY patches ./patches
COPY examples ./examples
COPY tools ./tools

# The NGC torch and TE are kept (no torch re-install): --no-deps for the pinned GPU packages,
# then the package's own pure-Python dependencies.
RUN pip install --no-deps megatron-core==0.16.1 \
 && pip install "sglang==0.5.3" --no-deps \
 && pip install --no-deps -e . \
 && pip install "transformers>=5.0,<6" "datasets>=3.0" "safetensors>=0.4" "math-verify>=0.7" \
        "pydantic>=2.5,<3" pyyaml tqdm tensorboard matplotlib psutil \
 && python patches/apply.py --apply

ENTRYPOINT ["gmpo-train"]

# The stgray image: the official Ray image of the pinned Ray / Python version, plus the
# exact dependency set of requirements-lock.txt, plus the package and a copy of the
# repository's jobs/ and configs/ under /home/ray/stgray.
#
#   docker build --build-arg VARIANT=cpu -t stgray:ray2.60.0-py311-cpu .   # head, CPU workers
#   docker build --build-arg VARIANT=gpu -t stgray:ray2.60.0-py311-gpu .   # GPU workers
#
# VARIANT is the platform suffix of the rayproject/ray tag: "cpu", "gpu" (an alias of the
# image's default CUDA build) or a specific "cuXYZ" such as "cu128". Tag and push the
# result to your registry and use it in cluster/kuberay/*.yaml (or as docker.image in
# cluster/aws.yaml / cluster/gcp.yaml, where the setup_commands then find everything
# installed). Keep RAY_VERSION equal to the ray pin of requirements-lock.txt and
# rayVersion of the KubeRay manifests (tests/cluster/test_cluster_configs.py checks it).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}

# ARGs declared before FROM must be declared again to be visible below it.
ARG RAY_VERSION
ARG VARIANT
# torch==2.13.0 from the lock: the CPU build on CPU images (a few hundred MB), the CUDA
# build from PyPI (with its nvidia-* wheels) on GPU images.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV TQDM_DISABLE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Created by RUN (as the image's user, ray) so that WORKDIR does not make it root-owned:
# the in-tree build of `pip install .` writes stgray.egg-info/ here.
RUN mkdir -p /home/ray/stgray
WORKDIR /home/ray/stgray

# Dependencies first, so that code changes do not invalidate this (large) layer.
COPY --chown=ray:users requirements-lock.txt ./
RUN if [ "${VARIANT}" = "cpu" ]; then EXTRA="--extra-index-url ${TORCH_CPU_INDEX}"; else EXTRA=""; fi \
 && pip install --no-cache-dir ${EXTRA} -r requirements-lock.txt \
 && python -c "import ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# The package (non-editable), then the job entry points and configs used with
# `python -m jobs.<name> configs/<file>.yaml` from this directory.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users stgray ./stgray
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build stgray.egg-info \
 && python -c "import stgray, torch, ray; print('stgray image: ray', ray.__version__, 'torch', torch.__version__)"
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs

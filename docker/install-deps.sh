# The project's pinned dependencies on top of the stage's torch, in the image build
# (docker/Dockerfile): sh install-deps.sh gpu|cpu, with pins.py, pip.sh and pyproject.toml in /tmp.
#
# The base's own builds (torch, triton, CUDA libraries, Transformer Engine, apex, flash-attn)
# are pinned at their installed versions, so no dependency can replace them: on NGC, a stock
# wheel would replace NVIDIA's build; on CPU, PyPI's torch is a CUDA build.
set -eu
variant=$1
python3 /tmp/pins.py installed torch triton 'pytorch-triton*' 'nvidia-*' 'transformer-engine*' apex \
  'flash-attn*' 'cudnn*' > /tmp/keep.txt
export PIP_CONSTRAINT=/tmp/keep.txt
# DeepSpeed's setup.py imports torch: no build isolation, so it builds against the stage's.
if [ "$variant" = cpu ]; then
  # Its CPU backend loads a shared-memory allreduce op when the first process group starts,
  # and would compile it then (a compiler in every container): build it now, with a compiler
  # removed again in this step (libgomp1, which the op links, is kept). --no-cache-dir: a
  # cached DeepSpeed wheel without the op must not be reused.
  apt-get update
  apt-get install -y --no-install-recommends g++ python3-dev
  DS_BUILD_SHM_COMM=1 sh /tmp/pip.sh install --no-cache-dir --no-build-isolation deepspeed==0.19.8
  apt-get purge -y --auto-remove g++ python3-dev
  apt-get clean
  rm -rf /var/lib/apt/lists/*
  check="from deepspeed.ops.comm import deepspeed_shm_comm_op; assert not torch.cuda.is_available()"
else
  sh /tmp/pip.sh install --no-build-isolation deepspeed==0.19.8
  check="import apex, transformer_engine; print('transformer_engine', transformer_engine.__version__)"
fi
python3 /tmp/pins.py requirements /tmp/pyproject.toml --extra postgres --without torch deepspeed > /tmp/requirements.txt
sh /tmp/pip.sh install -r /tmp/requirements.txt
python3 -c "import megatron.core, deepspeed, torch; print('$variant stack: torch', torch.__version__); $check"

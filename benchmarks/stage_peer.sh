# Sourced by the GPU-machine scripts: unpack FlashInfer staged in .peer/ (../shared/peers/stage-flashinfer.sh)
# onto PYTHONPATH, when it is there. Nothing happens without .peer/.
if [ -d .peer ]; then
  mkdir -p /tmp/site && tar -xJf .peer/fi_pkg.tar.xz -C /tmp/site 2>/dev/null && python3 -m pip install -q \
    --no-index --no-deps --no-compile --upgrade --target /tmp/site .peer/*.whl 2>/dev/null \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site MAX_JOBS=16
fi

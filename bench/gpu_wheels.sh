#!/usr/bin/env bash
# The Python packages a pipeline run needs that the GPU machine's image lacks (it has
# torch, transformers, pyarrow, pandas, pillow, pyyaml, psutil, nvidia-ml-py), as wheels
# for its Python, in DEST (default .whl/, git-ignored). Ray's wheel is trimmed of what a
# curation run never loads (its Java jar, the dashboard's source map, RLlib, Serve), so
# that the repository, the wheels and a source shard travel together in 64 MiB.
#
#     bash bench/gpu_wheels.sh [DEST]          # PY=3.12 by default
set -euo pipefail
DEST=${1:-.whl}
PY=${PY:-3.12}
RAY=${RAY:-$(python3 -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)}
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "ray==$RAY" webdataset braceexpand jsonschema jsonschema-specifications referencing rpds-py
python3 - "$DEST" <<'PY'
import sys
import zipfile
from pathlib import Path

DROP = ("ray/jars/", "ray/rllib/", "ray/serve/")
for wheel in Path(sys.argv[1]).glob("ray-*.whl"):
    trimmed = wheel.with_suffix(".trim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(DROP) or info.filename.endswith(".js.map"):
                continue
            dst.writestr(info, src.read(info.filename))
    trimmed.replace(wheel)
PY
du -ch "$DEST"/*.whl | tail -1

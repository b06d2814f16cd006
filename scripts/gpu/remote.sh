#!/usr/bin/env bash
# Run ON the device machine (the device tool's `run`, in the repository copy), one step per
# call, in this order (docs/benchmarks.md, "GPU"); files under /root outlive a call while
# the machine stays warm (30 s), so the calls must follow each other at once.
#
#   receive   append the carried part(s) of onnxruntime-gpu (.gpu/pN) to /root; with p1,
#             print the machine's GPU and Python packages
#   install   check the SHA-256, unpack onnxruntime-gpu and install .whl into /root/site
#             (in front of the machine's CPU onnxruntime), find CUDA's libraries, and write
#             /root/env.sh; prints the providers a session actually gets
#   export    a random-init ResNet-50 package (fp32, fp16 verified on CUDA, int8) in models/
#   test      the CUDA tests and the engine, provider, service and export tests
#   bench     python -m loadtests.gpu (args follow)
#   cores     python -m loadtests.cores on the CPU provider (args follow)
set -uo pipefail
step=${1:?step}; shift
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
[ -f /root/env.sh ] && source /root/env.sh
case "$step" in
receive)
  mkdir -p /root/ort-parts
  for dir in .gpu/p*; do
    [ -f "$dir/part" ] || continue
    name=$(basename "$dir")
    if [ ! -e "/root/ort-parts/$name" ]; then
      cat "$dir/part" >> /root/ort-gpu.tar.xz && touch "/root/ort-parts/$name"
    fi
  done
  ls /root/ort-parts; ls -l /root/ort-gpu.tar.xz
  if [ -d .gpu/p1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nproc; python3 --version
    python3 -m pip list 2>/dev/null | grep -i -E "^(torch|torchvision|onnx|onnxruntime|onnxscript|numpy|pillow|nvidia-cudnn-cu13|nvidia-cuda-runtime|nvidia-cublas|nvidia-ml-py|scikit-image|httpx|prometheus.client|pytest) "
  fi
  ;;
install)
  expected=$(cat .gpu/p*/SHA256 2>/dev/null | head -1)
  got=$(sha256sum /root/ort-gpu.tar.xz | cut -d' ' -f1)
  [ -n "$expected" ] && [ "$expected" = "$got" ] || { echo "SHA-256 $got != $expected"; exit 1; }
  rm -rf /root/site && mkdir -p /root/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/site .whl/*.whl || exit 1
  xz -dc /root/ort-gpu.tar.xz | tar -C /root/site -xf - || exit 1
  site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  libs=$(ls -d "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib 2>/dev/null | sort -u | paste -sd:)
  probe='import onnxruntime as o, onnx
from onnx import helper as h, TensorProto as T
g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "p", [h.make_tensor_value_info("x", T.FLOAT, [1])], [h.make_tensor_value_info("y", T.FLOAT, [1])])
m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=10)
s = o.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print(o.__version__, o.__file__, s.get_providers())
raise SystemExit(0 if s.get_providers()[0] == "CUDAExecutionProvider" else 1)'
  echo "export PYTHONPATH=/root/site:$PWD" > /root/env.sh
  if PYTHONPATH=/root/site python3 -c "$probe"; then
    echo "CUDA found with no help"
  elif LD_LIBRARY_PATH=$libs PYTHONPATH=/root/site python3 -c "$probe"; then
    echo "CUDA found with LD_LIBRARY_PATH=$libs"
    echo "export LD_LIBRARY_PATH=$libs" >> /root/env.sh
  else
    echo "CUDA provider did not start"; exit 1
  fi
  cat /root/env.sh
  ;;
export)
  mkdir -p models
  time python3 -m model_export --random-init --out models/resnet50 --precision fp16 --precision int8 2>&1 | tee "$OUT/export.log"
  python3 -c "import json; m = json.load(open('models/resnet50/manifest.json'))
for p, v in m['variants'].items():
    c = v['verification']; print(p, c.get('provider'), c['passed'], [(x['inputs'], x['batch_size'], round(x['logits_max_rel_diff'], 6), round(x['embedding_min_cosine'], 6), x['top1_agreement']) for x in c['checks']])"
  ;;
test)
  PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider -W default -o addopts="" "$@" 2>&1 | tee "$OUT/tests.log"
  ;;
bench)
  nvidia-smi dmon -s um -d 1 -o T > "$OUT/dmon.log" 2>&1 &
  dmon=$!
  PYTHONUNBUFFERED=1 python3 -m loadtests.gpu --out /tmp/bench "$@" 2>&1 | tee "$OUT/bench.log"
  kill "$dmon"
  cp /tmp/bench/gpu.json "$OUT/"
  tail -n 20 /tmp/bench/logs/*.log > "$OUT/server-logs.txt"
  ;;
cores)
  PYTHONUNBUFFERED=1 python3 -m loadtests.cores --out /tmp/cores "$@" 2>&1 | tee "$OUT/cores.log"
  cp /tmp/cores/*.json "$OUT/"
  ;;
*)
  echo "unknown step $step"; exit 2
  ;;
esac

#!/usr/bin/env bash
# On a GPU machine: run the agent's GPU module against the real NVML and check what it would put
# in a heartbeat against nvidia-smi. Needs nvidia-ml-py (installed on the lent GPU machines) and
# nothing else of the project's: nodeagent.gpu imports only the standard library and pynvml.
# Usage: bash bench/gpu_check.sh   (exit status 0 when every GPU matches)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

echo "== nvidia-smi"
nvidia-smi --query-gpu=index,name,memory.total,memory.free,utilization.gpu,uuid --format=csv,noheader,nounits \
    | tee /tmp/llmfleet-nvidia-smi.csv
echo "== python -m nodeagent.gpu (the GPU part of a heartbeat)"
"$python" -m nodeagent.gpu | tee /tmp/llmfleet-gpu.json

"$python" - <<'PY'
import csv, json, sys
agent = json.load(open("/tmp/llmfleet-gpu.json"))
smi = list(csv.reader(open("/tmp/llmfleet-nvidia-smi.csv"), skipinitialspace=True))
problems = []
if not agent["available"]:
    problems.append(f"NVML not available to the agent: {agent['absent_reason']}")
if len(agent["gpus"]) != len(smi):
    problems.append(f"agent sees {len(agent['gpus'])} GPUs, nvidia-smi {len(smi)}")
mib = 1024 * 1024
for gpu, (index, name, total, free, util, uuid) in zip(agent["gpus"], smi):
    checks = {
        "index": gpu["index"] == int(index),
        "name": gpu["name"] == name,
        "uuid": gpu["uuid"] == uuid,
        "memory_total": abs(gpu["memory_total"] / mib - float(total)) <= 1,
        # free memory moves between the two reads; allow 2 % of the total
        "memory_free": abs(gpu["memory_free"] / mib - float(free)) <= 0.02 * float(total),
        "utilization": gpu["utilization"] is not None and 0 <= gpu["utilization"] <= 100,
    }
    for what, ok in checks.items():
        print(f"GPU {gpu['index']} {what:<13} {'ok' if ok else 'MISMATCH'}")
        if not ok:
            problems.append(f"GPU {gpu['index']}: {what}")
print("RESULT", "PASS" if not problems else "FAIL " + "; ".join(problems))
sys.exit(1 if problems else 0)
PY

#!/bin/bash
# The EMT example campaign on a fresh demo store, then the first prediction after it; wall times and peak RSS.
#   bash benchmarks/campaign_emt.sh [work folder, default /tmp/cspml-emt]   (run from the checkout)
set -euo pipefail
W=${1:-/tmp/cspml-emt}
REPO=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$W" && mkdir -p "$W"
export CSPML_HOME=$W/home OPENBLAS_NUM_THREADS=1
CSPML=$REPO/.venv/bin/cspml
cd "$W"
/usr/bin/time -v "$CSPML" demo --out "$W/demo" > demo.log 2> demo.time
/usr/bin/time -v "$CSPML" campaign run "$REPO/configs/campaign_emt.yaml" --json campaign.json > campaign.log 2> campaign.time
/usr/bin/time -v "$CSPML" predict NaCl > predict.log 2> predict.time
"$REPO/.venv/bin/python" - "$W" <<'PY'
import json, re, sys
w = sys.argv[1]
for r in json.load(open(f"{w}/campaign.json"))["rounds"]:
    print(f"round {r['round']}: {r['seconds']:.1f} s, {r['n_candidates']} candidates, {r['n_computed']} relaxed, "
          f"{len(r['promoted'])} promoted")
for name in ("demo", "campaign", "predict"):
    t = open(f"{w}/{name}.time").read()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", t).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
    print(f"{name}: wall {wall}, peak RSS {rss:.0f} MB")
PY

#!/usr/bin/env bash
# SmolLM2-135M on the CPU: int4 (the GGUF's Q4_1 as is) and int8, interleaved, as the README quotes.
#   bash benchmarks/smollm2_cpu.sh [THREADS]      -> benchmarks/results/smollm2-*.json
set -euo pipefail
threads=${1:-2}
out=$(dirname "$0")/results
mkdir -p "$out"
gguf=$(dirname "$(edgerun pull smollm2-135m)")/SmolLM2-135M-Instruct.Q4_1.gguf
int8=$out/smollm2-int8.edr
[ -f "$int8" ] || edgerun convert "$gguf" -o "$int8" --quant int8 -q
for round in 1 2; do
  cold=$([ "$round" = 2 ] && echo --cold || true)
  edgerun bench smollm2-135m --threads "$threads" --json $cold > "$out/smollm2-int4-$round.json"
  edgerun bench "$int8" --threads "$threads" --json $cold > "$out/smollm2-int8-$round.json"
done
python3 - "$out" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/smollm2-*.json")):
    r = json.load(open(f))
    jit = r.get("jit")
    print(f"{f.split('/')[-1]:<22} prefill {r['prefill_tok_s']:7.1f} tok/s  decode {r['decode_tok_s']:6.1f} tok/s  "
          f"rss {r['peak_rss_mib']:.0f} MiB" + (f"  start cold {jit['cold']['total_s']:.2f} s warm {jit['warm']['total_s']:.2f} s" if jit else ""))
PY

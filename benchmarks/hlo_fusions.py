"""Print the fused computations behind a profile's heaviest single-launch XLA ops, read
from an optimised HLO dump, so a profile name (`input_reduce_fusion_4`) can be mapped to
what it computes. Usage: python benchmarks/hlo_fusions.py PROFILE.json HLO.txt [TOP]"""
import json
import re
import sys


def fusion_text(hlo: str, op_name: str, limit: int = 6000) -> str:
    name = re.sub(r"_(\d+)$", r".\1", op_name)  # the profiler writes fusion.4 as fusion_4
    call = re.search(rf"^\s*(?:ROOT )?%{re.escape(name)} = .*$", hlo, re.M)
    if not call:
        return f"{op_name}: not in this HLO\n"
    called = re.search(r"calls=%([\w.\-]+)", call.group(0))
    body = ""
    if called:
        start = re.search(rf"^%{re.escape(called.group(1))} .*\{{$", hlo, re.M)
        if start:
            body = hlo[start.start(): hlo.find("\n}", start.start()) + 2]
    text = call.group(0).strip() + "\n" + body
    # Keep each instruction's JAX op name (which line of the model made it), drop the rest.
    text = re.sub(r', metadata=\{op_name="([^"]*)"[^}]*\}', r'  # \1', text)
    return text[:limit] + "\n"


def main():
    profile, hlo = json.load(open(sys.argv[1])), open(sys.argv[2]).read()
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    ops = [o for o in profile["ops"] if o["category"] == "other XLA" and o["launches_per_call"] == 1][:top]
    for op in ops:
        print(f"===== {op['name']}: {op['ms_per_call']} ms per step")
        print(fusion_text(hlo, op["name"]))


if __name__ == "__main__":
    main()

"""A stand-in for `nvidia-smi` on simulated instances (copied into the instance's bin/).

It prints the values the simulator keeps in the instance's `.vastsim/gpu.json`,
read fresh on every call, so a scenario (e.g. 92 C) can change mid-run.
Supported: `-L`, `--query-gpu=FIELDS --format=csv[,noheader][,nounits]`,
`-i/--id=N`, and a short summary when called with no arguments. Stdlib only.
"""

import json
import os
import sys

UNITS = {
    "temperature.gpu": "",
    "utilization.gpu": "%",
    "utilization.memory": "%",
    "memory.used": "MiB",
    "memory.total": "MiB",
    "memory.free": "MiB",
    "power.draw": "W",
    "power.limit": "W",
    "clocks.sm": "MHz",
    "clocks.max.sm": "MHz",
    "fan.speed": "%",
}
ALIASES = {"clocks_event_reasons.active": "clocks_throttle_reasons.active", "gpu_name": "name",
           "gpu_uuid": "uuid", "temperature": "temperature.gpu"}


def gpu_state_path() -> str:
    bin_dir = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(bin_dir), ".vastsim", "gpu.json")


def load_gpus() -> list:
    with open(gpu_state_path()) as handle:
        gpus = json.load(handle)["gpus"]
    for gpu in gpus:
        gpu.setdefault("memory.free", gpu["memory.total"] - gpu["memory.used"])
    return gpus


def parse_args(argv: list) -> dict:
    options = {"query": None, "format": "", "list": False, "index": None}
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, _, value = arg.partition("=")
        if arg in ("-L", "--list-gpus"):
            options["list"] = True
        elif name in ("--query-gpu", "--format", "--id", "-i"):
            if not value:
                if not args:
                    raise SystemExit(f"Option {name} needs a value.")
                value = args.pop(0)
            key = {"--query-gpu": "query", "--format": "format", "--id": "index", "-i": "index"}[name]
            options[key] = value
        else:
            raise SystemExit(f"vastsim nvidia-smi: unsupported option {arg!r}")
    return options


def format_value(gpu: dict, field: str, with_units: bool) -> str:
    value = gpu[field]
    if isinstance(value, float):
        text = f"{value:.2f}"
    else:
        text = str(value)
    unit = UNITS.get(field, "")
    return f"{text} {unit}" if with_units and unit else text


def query(gpus: list, spec: str, fmt: str) -> str:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    fields = [ALIASES.get(n, n) for n in names]
    for name, field in zip(names, fields):
        if field not in gpus[0]:
            print(f'Field "{name}" is not a valid field to query.', file=sys.stderr)
            raise SystemExit(2)
    flags = set(fmt.split(","))
    if "csv" not in flags:
        raise SystemExit('vastsim nvidia-smi: only --format=csv is supported')
    lines = []
    if "noheader" not in flags:
        header = [n if "nounits" in flags or not UNITS.get(f) else f"{n} [{UNITS[f]}]"
                  for n, f in zip(names, fields)]
        lines.append(", ".join(header))
    for gpu in gpus:
        lines.append(", ".join(format_value(gpu, f, "nounits" not in flags) for f in fields))
    return "\n".join(lines)


def summary(gpus: list) -> str:
    lines = [f"vastsim nvidia-smi    Driver Version: {gpus[0]['driver_version']}"]
    for gpu in gpus:
        lines.append(
            f"| {gpu['index']}  {gpu['name']:<28} | {gpu['temperature.gpu']}C  {gpu['power.draw']:.0f}W"
            f" / {gpu['power.limit']:.0f}W | {gpu['memory.used']}MiB / {gpu['memory.total']}MiB"
            f" | {gpu['utilization.gpu']}% |")
    return "\n".join(lines)


def main(argv: list) -> int:
    options = parse_args(argv)
    gpus = load_gpus()
    if options["index"] is not None:
        wanted = {int(i) for i in str(options["index"]).split(",")}
        gpus = [g for g in gpus if g["index"] in wanted]
        if not gpus:
            print("No devices were found", file=sys.stderr)
            return 6
    if options["list"]:
        print("\n".join(f"GPU {g['index']}: {g['name']} (UUID: {g['uuid']})" for g in gpus))
    elif options["query"]:
        print(query(gpus, options["query"], options["format"]))
    else:
        print(summary(gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Run the Vast simulator in the foreground:

    python -m infra.vastsim --port 8765 --state-dir runs/vastsim [--api-key KEY] [--python PATH]

Ctrl-C (or SIGTERM) destroys every instance and exits.
"""

import argparse
import json
import logging
import signal
import sys
import threading

from .simulator import DEFAULT_API_KEY, Simulator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.vastsim", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765, help="HTTP port on 127.0.0.1 (default 8765)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--state-dir", required=True, help="instance disks, vastsim-state.json, vastsim.log")
    parser.add_argument("--api-key", default=None,
                        help=f"account API key the simulator accepts (default {DEFAULT_API_KEY!r})")
    parser.add_argument("--python", default=None,
                        help="interpreter behind `python` on instances (default: this one)")
    parser.add_argument("--offers", default=None, help="JSON file with a list of offer configs")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    offers = json.load(open(args.offers)) if args.offers else None
    sim = Simulator(args.state_dir, api_key=args.api_key or DEFAULT_API_KEY, offers=offers,
                    python=args.python, host=args.host, port=args.port).start()
    key_hint = "the key you passed" if args.api_key else DEFAULT_API_KEY
    print(f"vastsim listening on {sim.url}", flush=True)
    print(f"  API key: {key_hint}   state: {sim.state_dir}/vastsim-state.json", flush=True)
    print(f"  python: VastAI(api_key=KEY, server_url={sim.url!r})", flush=True)
    print("  Ctrl-C destroys every instance and stops.", flush=True)

    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    done.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

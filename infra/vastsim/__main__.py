"""Run the Vast simulator in the foreground:

    python -m infra.vastsim --port 8765 --state-dir runs/vastsim [--api-key-file FILE] [--python PATH]

Without --api-key-file it makes up an account key and writes it to STATE_DIR/api_key (mode 0600),
where `make ablation BACKEND=vast` reads it; a key is never an argument, so it never shows in `ps`.
Ctrl-C (or SIGTERM) destroys every instance and exits.
"""

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from .simulator import Simulator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.vastsim", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765, help="HTTP port on 127.0.0.1 (default 8765)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--state-dir", required=True, help="instance disks, vastsim-state.json, vastsim.log")
    parser.add_argument("--api-key-file", default=None,
                        help="file holding the account API key to accept (default: a new key in STATE_DIR/api_key)")
    parser.add_argument("--python", default=None,
                        help="interpreter behind `python` on instances (default: this one)")
    parser.add_argument("--offers", default=None, help="JSON file with a list of offer configs")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    offers = json.load(open(args.offers)) if args.offers else None
    if args.api_key_file:
        key_file = Path(args.api_key_file)
        api_key = key_file.read_text().strip()
    else:
        key_file = Path(args.state_dir) / "api_key"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        api_key = secrets.token_hex(16)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(api_key + "\n")
    sim = Simulator(args.state_dir, api_key=api_key, offers=offers,
                    python=args.python, host=args.host, port=args.port).start()
    print(f"vastsim listening on {sim.url}", flush=True)
    print(f"  API key in {key_file}   state: {sim.state_dir}/vastsim-state.json", flush=True)
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

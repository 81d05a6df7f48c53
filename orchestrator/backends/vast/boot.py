"""The dead-man switch a Vast instance arms at boot, before anyone can SSH in (its `onstart` command)."""

from __future__ import annotations

import shlex

from orchestrator.backends.vast.config import VastConfig

DEFAULT_API_URL = "https://console.vast.ai"          # the SDK's and supervisor.py's default

# Started by the instance's own start command (onstart), before anyone can SSH in: destroys the
# instance with its instance-scoped key (CONTAINER_API_KEY, never the account key) when the
# last-contact file has been quiet for `silence` seconds (or the shorter silence the orchestrator last wrote
# into it), or after `lifetime` seconds. Standard library only; argv: contact file, silence, lifetime, check
# period, API URL.
BOOT_WATCHDOG = """
import os, sys, time, urllib.request as u
contact, silence, lifetime, period, url = sys.argv[1], *map(float, sys.argv[2:5]), sys.argv[5]
started = time.time()
open(contact, "a").close()
os.utime(contact, None)
while True:
    time.sleep(period)
    now = time.time()
    try:
        quiet = now - os.path.getmtime(contact)
    except OSError:
        quiet = now - started
    try:    # a shorter silence the orchestrator wrote at its last contact (what the budget still pays for)
        limit = min(silence, float(open(contact).read(64).strip() or "inf"))
    except (OSError, ValueError):
        limit = silence
    if quiet <= limit and now - started <= lifetime:
        continue
    me, key = os.environ.get("CONTAINER_ID", ""), os.environ.get("CONTAINER_API_KEY", "")
    print(time.strftime("%Y-%m-%dT%H:%M:%S"), "boot watchdog: quiet %.0fs, up %.0fs: destroying"
          % (quiet, now - started), flush=True)
    try:
        u.urlopen(u.Request(url + "/api/v0/instances/" + "".join(c for c in me if c.isalnum()) + "/", data=b"{}",
                            method="DELETE", headers={"Authorization": "Bearer " + key,
                                                      "Content-Type": "application/json"}), timeout=30)
        break
    except Exception as exc:
        print("destroy failed:", exc, flush=True)
        if getattr(exc, "code", None) == 404:
            break
"""


def boot_watchdog_onstart(cfg: VastConfig, silence_seconds: float | None = None) -> str:
    """The instance's start command: the dead-man switch, armed before SSH answers (an orchestrator killed
    while the instance boots leaves no orphan). install_helper_and_watchdog adds the full one later.
    `silence_seconds`: the instance's own silence (the budget's, see budget.py); default the configured one."""
    q = shlex.quote
    silence = cfg.orchestrator_silence_seconds if silence_seconds is None else silence_seconds
    base = f'"$HOME"/{q(cfg.remote_dir.strip("/"))}'
    argv = [f"{base}/last-contact", f"{silence:g}", f"{cfg.max_lifetime_hours * 3600:g}",
            f"{min(5.0, silence / 4):g}", q(cfg.server_url or DEFAULT_API_URL)]
    return (f"mkdir -p {base} && nohup python3 -c {q(BOOT_WATCHDOG)} {' '.join(argv)} "
            f">> {base}/boot-watchdog.log 2>&1 < /dev/null &\n")



"""The Vast.ai backend: rented GPUs, deployed through git, watched over SSH, torn down with confirmation.

    config.py    VastConfig, the `vast:` section of an arms spec
    offers.py    the search query and the ranking of offers
    provider.py  launch / wait_ready / query / terminate / list_ours over the vastai SDK
    ssh.py       paramiko with pinned host keys, quoted commands, timeouts, retries, safe pull-back
    deploy.py    the commit's tree (a git bundle, no history) + patch, dependencies, remote layout, boot dead-man switch
    pool.py      instances shared by attempts (packing, reuse)
    attempt.py   one attempt's files and supervisor on the instance
    watch.py     one attempt's loop: metrics, health, checkpoints, outcome; the budget
    backend.py   VastBackend (base.Backend)
    reap.py      destroy this ledger's instances no live run owns (other ledgers' are only listed)
"""

from orchestrator.backends.vast.backend import VastBackend
from orchestrator.backends.vast.config import VastConfig
from orchestrator.backends.vast.provider import make_client
from orchestrator.backends.vast.reap import reap

__all__ = ["VastBackend", "VastConfig", "make_client", "reap"]

"""The Vast.ai provider: rented GPUs, deployed and watched by the remote-host runtime (../remote/), torn down
with confirmation.

    config.py    VastConfig, the `vast:` section of an arms spec (and the RuntimeSettings it gives ../remote/)
    offers.py    the search query and the ranking of offers
    provider.py  launch / wait_ready / query / terminate / list_ours over the vastai SDK
    boot.py      the dead-man switch armed at boot (the instance's onstart)
    budget.py    the dollar budget: launches it allows, the silence it pays for
    backend.py   VastBackend (base.Backend; the HostOwner of ../remote/watch.py)
    reap.py      destroy this ledger's instances no live run owns (other ledgers' are only listed)
"""

from orchestrator.backends.vast.backend import VastBackend
from orchestrator.backends.vast.config import VastConfig
from orchestrator.backends.vast.provider import make_client
from orchestrator.backends.vast.reap import reap

__all__ = ["VastBackend", "VastConfig", "make_client", "reap"]

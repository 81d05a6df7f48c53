"""vastsim: a local Vast.ai for the real `vastai` SDK, with real sshd instances.

    from infra.vastsim import Simulator
    sim = Simulator(state_dir, api_key="k", offers=[...]).start()
    VastAI(api_key="k", server_url=sim.url)
    ...
    sim.stop()   # destroys every instance and kills all their processes

See server.py for the HTTP routes and faults.py for the fault names.
"""

from .faults import INSTANCE_FAULT_NAMES, REQUEST_FAULT_NAMES
from .instances import GPU_VALUE_NAMES
from .offers import DEFAULT_OFFERS
from .simulator import DEFAULT_API_KEY, SimError, Simulator

__all__ = ["Simulator", "SimError", "DEFAULT_API_KEY", "DEFAULT_OFFERS", "INSTANCE_FAULT_NAMES",
           "REQUEST_FAULT_NAMES", "GPU_VALUE_NAMES"]

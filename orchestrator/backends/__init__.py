"""Backends run one attempt of an arm run somewhere: on this machine's Ray, or on a remote host.

    base.py        the Backend interface the scheduler calls, and the events an attempt reports
    provision.py   the provider seam (launch / wait_ready / query / terminate / list_ours), the Host it hands
                   over, and each backend's declared Capabilities (bills? rents instances? runs here?)
    local.py       this machine's Ray, or a Ray cluster (transfer.py: files through Ray, no shared filesystem)
    remote/        the remote-host runtime, provider-free: SSH, deploy, supervisor, pull-back, health, packing
    vast/          provider: rented Vast.ai instances
    ssh/           provider: machines you already have
"""

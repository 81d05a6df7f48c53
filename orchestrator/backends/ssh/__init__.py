"""The `ssh` provider: machines you already have (a desktop, a spare workstation), reached over SSH.

    config.py    SshConfig, the `ssh:` section of an arms spec (hosts, timings; the RuntimeSettings per host)
    provider.py  SshHosts: the provision seam for owned hosts (host keys pinned in the ledger, cleanup = terminate)
    backend.py   SshBackend (base.Backend; the HostOwner of ../remote/watch.py)
"""

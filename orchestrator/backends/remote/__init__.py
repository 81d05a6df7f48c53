"""The remote-host runtime: runs arms on a host reached over SSH, for any provider (see ../provision.py).

    settings.py  RuntimeSettings: timeouts, periods, the dead-man switch (built by each provider's config)
    ssh.py       paramiko with pinned host keys, quoted commands, timeouts, retries, safe pull-back
    deploy.py    the commit's tree (a git bundle, no history) + patch, dependencies, remote layout
    pool.py      hosts shared by attempts (packing arms by GPU, reuse)
    attempt.py   one attempt's files and supervisor on the host (infra/remote/supervisor.py)
    watch.py     one attempt's loop: metrics, health, checkpoints, outcome; asks its HostOwner (the backend)
"""

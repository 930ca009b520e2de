"""containerd proxy snapshotter (``lazyd snapshotter``).

``config`` (the ``[snapshotter]`` table), ``metadata`` (SQLite), ``overlay`` (directories
and mounts like containerd's snapshots/overlay), ``filters`` (containerd filter syntax),
``remote`` (remote-snapshot labels and lazyd API calls), ``snapshotter`` (the logic),
``service`` (the gRPC servicer and socket).
"""

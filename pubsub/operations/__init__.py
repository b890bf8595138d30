"""Running a node: its settings, the service, several workers, and what it reports.

``config`` (the settings, from defaults, the conf file, the environment and
the command line), ``service`` (a node built from them, and ``twistd
pubsub``), ``cluster`` (``pubsub-cluster``: workers sharing the ports) and
``metrics`` (``/healthz`` and ``/metrics``).
"""

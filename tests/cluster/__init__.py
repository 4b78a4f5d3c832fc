"""Test infrastructure: a real Kubernetes control plane, a process kubelet and S3 on loopback.

See ``tests/cluster/README.md``. Build the binaries once with ``tests/cluster/build.sh``.
"""

from .controlplane import Cluster, ControlPlane, HarnessNotBuilt
from .kubelet import ProcessKubelet
from .s3 import MotoS3, Radosgw, S3Credentials, S3NotAvailable, S3Server

__all__ = [
    "Cluster",
    "ControlPlane",
    "HarnessNotBuilt",
    "MotoS3",
    "ProcessKubelet",
    "Radosgw",
    "S3Credentials",
    "S3NotAvailable",
    "S3Server",
]

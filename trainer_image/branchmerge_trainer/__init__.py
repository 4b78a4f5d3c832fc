"""branchmerge workloads: SFT, merge and eval stages run by ``branchmerge-train``.

Importing this package must not import torch: the operator image uses ``stages``.
"""

__version__ = "0.1.0"

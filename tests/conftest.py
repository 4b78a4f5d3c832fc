"""Shared pytest configuration. Keep it small: fixtures live next to what they set up."""

# Real control plane, process kubelet and S3 fixtures: cluster, k8s_api, namespace,
# node_factory, s3, s3_bucket, s3_secret, moto_s3 (see tests/cluster/README.md).
pytest_plugins = ["tests.cluster.fixtures"]

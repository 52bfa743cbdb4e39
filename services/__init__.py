"""The deployables: one folder per process, named as its image and its compose/k8s service."""

"""Ebbtide's control plane: the Kopf operator (see issue: Kubernetes operator)."""

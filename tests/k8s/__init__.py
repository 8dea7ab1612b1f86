"""Tests of the Kubernetes surface: CRDs, examples, and the API server emulator."""

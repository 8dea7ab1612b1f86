"""Tests of the Helm chart (charts/ebbtide) and the image it runs (Dockerfile)."""

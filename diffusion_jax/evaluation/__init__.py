"""Sampling and evaluation."""

"""Evaluation: Inception, the digits classifier, metrics, reference statistics and the
--mode=eval job."""

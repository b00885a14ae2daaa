"""Planograms and compliance: pure logic that the edge and the cloud both use."""

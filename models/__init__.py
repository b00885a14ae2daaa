"""Inference runtime: detector, SKU recognizer, gallery and model bundles.

Imports none of the other ShelfLoop packages, and never torch or ultralytics.
"""

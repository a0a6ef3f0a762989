"""Swappable parts of a selfflow experiment.

Every component works on plain tensors and constructor arguments: none imports
gin, Ray, MLflow or `selfflow.platform`. The platform registers them with gin.
"""

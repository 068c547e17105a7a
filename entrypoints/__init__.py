"""Thin MLflow entry points: each parses its parameters and calls one library stage."""

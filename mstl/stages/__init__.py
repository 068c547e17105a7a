"""The stage runners, one module per MLflow entry point: each validates its parameters, calls the
library packages and logs to MLflow. Nothing below this package imports it (pyproject.toml's import
contract)."""

"""Small programs the tests start as separate processes (workers sharing one study)."""

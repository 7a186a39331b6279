"""Helpers shared by the tests."""
import numpy as np


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64: the relative error every tolerance in the suite means."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

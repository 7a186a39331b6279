"""Helpers shared by the tests (imported as `helpers`: tests/ is on the path, as for `torch_models`)."""
import numpy as np


def rel_err(a, b):
    """Relative error of `a` against the reference `b` in the Frobenius norm, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)

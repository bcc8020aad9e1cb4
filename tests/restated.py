"""Expected values restated independently of the package, shared by several tests."""


def alg1_step(m, low, e, b):
    """Algorithm 1 lines 12-19 written out: budget ``m`` and low-hit count ``low`` after a round whose
    effective lengths are ``e``; ``b`` holds min, max, step, margin, rho and patience."""
    hit = sum(x >= max(b["min"], m - b["margin"]) for x in e) / len(e)
    if hit >= b["rho"]:
        return min(m + b["step"], b["max"]), 0
    if low + 1 >= b["patience"]:
        return max(m - b["step"], b["min"]), 0
    return m, low + 1

"""Privacy audits: re-verify the ledgers, re-account every epsilon, report, audit empirically with canaries.

``verify``: chains, signatures, attestations, epsilon recomputation. ``accounting``: an independent epsilon
from Google's dp-accounting (PLD). ``canary``: the one-run empirical lower bound. ``report`` and ``plots``:
HTML (inline SVG) and JSON. ``cli``: ``privatune audit``. ``example``: a small synthetic federation.
"""

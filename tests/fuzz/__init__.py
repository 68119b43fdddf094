"""Bounded-time fuzzing of a live in-process gateway (docs/security.md, "Fuzzing").

``cases`` generates hostile input from a seed, ``harness`` throws it at a
gateway and judges every connection's end, ``test_gateway_fuzz`` runs it in
CI for a fixed budget, and ``python -m tests.fuzz.run --seconds N`` runs it
by hand for as long as you like.
"""
